-- Lifecycle functions: what the operator (and `seckill up`) call to register,
-- start, finish and read a promotion. Each answers one JSON snapshot.

-- seckill_v3_schedule: registers a promotion and starts it when its publish
-- time has come.
-- keys: state hash, event stream.
-- args: promotion id, discount, numberOfCoupons, publish_ms, finish_ms, publishTime, finishTime.
-- Idempotent: PromotionStarted is appended once however often this runs.
-- Before the start the spec may change ("updated"); after it, a different spec
-- is refused ("locked") and the running promotion is left as it is. A shard
-- of a sharded promotion is answered "sharded" and left as it is.
redis.register_function('seckill_v3_schedule', function(keys, args)
  local key, stream = keys[1], keys[2]
  local promotion, discount, coupons = args[1], args[2], args[3]
  local publish_ms, finish_ms = args[4], args[5]
  local publish_time, finish_time = args[6], args[7]
  local now = now_ms()
  local s = state_of(key)
  if s and s.shards then
    return snapshot('sharded', s, now)
  end
  local result
  local function write_spec()
    redis.call('HSET', key, 'promotion', promotion, 'discount', discount, 'coupons', coupons,
      'publish_ms', publish_ms, 'finish_ms', finish_ms, 'publish_time', publish_time,
      'finish_time', finish_time)
  end
  if not s then
    write_spec()
    redis.call('HSET', key, 'phase', 'Pending', 'started', '0', 'granted', '0')
    result = 'scheduled'
  else
    local same = s.discount == tonumber(discount) and s.coupons == tonumber(coupons)
      and s.publish_ms == tonumber(publish_ms) and s.finish_ms == tonumber(finish_ms)
    if same then
      result = 'unchanged'
    elseif not s.started and s.phase == 'Pending' then
      write_spec()
      result = 'updated'
    else
      result = 'locked'
    end
  end
  s = state_of(key)
  if s.phase ~= 'Finished' and not s.started and now >= s.publish_ms then
    ensure_started(key, stream, s, now)
    if result ~= 'locked' then result = 'started' end
  end
  return snapshot(result, s, now)
end)

-- seckill_v3_finish: ends a promotion, appending PromotionFinished exactly once.
-- keys: state hash, event stream. args: reason, Expired | Deleted.
-- Expired is refused before the finish time by Redis' clock ("not_due"), so an
-- operator whose host clock runs ahead closes nothing early. A promotion whose
-- whole window passed unstarted gets its PromotionStarted first, so the stream
-- always reads Started then Finished. Deleted before the publish time finishes
-- it without a start. A shard of a sharded promotion is answered `sharded`:
-- its finish takes the three phases of shards.lua.
redis.register_function('seckill_v3_finish', function(keys, args)
  local key, stream = keys[1], keys[2]
  local reason = args[1]
  local now = now_ms()
  local s = state_of(key)
  if not s then
    return snapshot('unknown', nil, now)
  end
  if s.shards then
    return snapshot('sharded', s, now)
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
end)

-- seckill_v3_snapshot: the promotion's command-side state and Redis' clock.
-- keys: state hash. Read-only.
redis.register_function{
  function_name = 'seckill_v3_snapshot',
  callback = function(keys, args)
    return snapshot('snapshot', state_of(keys[1]), now_ms())
  end,
  flags = { 'no-writes' },
}
