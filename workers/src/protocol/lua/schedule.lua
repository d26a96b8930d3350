-- schedule: registers a promotion and starts it when its publish time has come.
-- KEYS[1] state hash, KEYS[2] event stream.
-- ARGV: promotion id, discount, numberOfCoupons, publish_ms, finish_ms, publishTime, finishTime.
-- Idempotent: PromotionStarted is appended once however often this runs.
-- Before the start the spec may change ("updated"); after it, a different spec
-- is refused ("locked") and the running promotion is left as it is.
local key, stream = KEYS[1], KEYS[2]
local promotion, discount, coupons = ARGV[1], ARGV[2], ARGV[3]
local publish_ms, finish_ms = ARGV[4], ARGV[5]
local publish_time, finish_time = ARGV[6], ARGV[7]
local now = now_ms()
local s = state_of(key)
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
