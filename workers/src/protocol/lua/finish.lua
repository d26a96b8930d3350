-- finish: ends a promotion, appending PromotionFinished exactly once.
-- KEYS[1] state hash, KEYS[2] event stream. ARGV[1] reason: Expired | Deleted.
-- Expired is refused before the finish time by Redis' clock ("not_due"), so an
-- operator whose host clock runs ahead closes nothing early. A promotion whose
-- whole window passed unstarted gets its PromotionStarted first, so the stream
-- always reads Started then Finished. Deleted before the publish time finishes
-- it without a start.
local key, stream = KEYS[1], KEYS[2]
local reason = ARGV[1]
local now = now_ms()
local s = state_of(key)
if not s then
  return snapshot('unknown', nil, now)
end
if s.phase == 'Finished' then
  return snapshot('already_finished', s, now)
end
if reason == 'Expired' and now < s.finish_ms then
  return snapshot('not_due', s, now)
end
if now >= s.publish_ms then
  ensure_started(key, stream, s, now)
end
finish_now(key, stream, s, reason, now)
return snapshot('finished', s, now)
