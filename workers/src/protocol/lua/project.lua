-- project: applies one event to the read model of one promotion.
-- KEYS[1] read-model hash of the promotion (seckill:rm:promotion:{ns/name}).
-- ARGV[1] event type, then per type:
--   PromotionStarted:  promotion, discount, numberOfCoupons, publishTime, finishTime, startedAt
--   CouponGrabbed:     promotion, coupon sequence number (N of couponId ns/name#N), discount
--   PromotionFinished: promotion, reason, granted, finishedAt
-- Answers the phase the read model is in afterwards.
--
-- Projectors deliver at least once and, across replicas, in any order. Every
-- rule here is therefore monotone, so that applying an event twice, or
-- Finished before Started, or a grab before Started, converges to the state
-- the in-order stream gives:
--   * phase only moves Pending -> Active -> Finished (a grab implies Active);
--   * granted = max(granted, what the event proves was granted);
--   * every other field is written only when absent (events never disagree).
local key = KEYS[1]
local kind = ARGV[1]
local rank = { Pending = 0, Active = 1, Finished = 2 }

local function raise_phase(to)
  local current = redis.call('HGET', key, 'phase') or 'Pending'
  if (rank[to] or 0) > (rank[current] or 0) then
    redis.call('HSET', key, 'phase', to)
    return to
  end
  return current
end

local function raise_granted(n)
  n = tonumber(n) or 0
  local current = tonumber(redis.call('HGET', key, 'granted'))
  if current == nil or n > current then
    redis.call('HSET', key, 'granted', n)
  end
end

local function set_absent(field, value)
  if value ~= nil and value ~= '' then
    redis.call('HSETNX', key, field, value)
  end
end

if kind == 'PromotionStarted' then
  set_absent('promotion', ARGV[2])
  set_absent('discount', ARGV[3])
  set_absent('numberOfCoupons', ARGV[4])
  set_absent('publishTime', ARGV[5])
  set_absent('finishTime', ARGV[6])
  set_absent('startedAt', ARGV[7])
  raise_granted(0)
  return raise_phase('Active')
elseif kind == 'CouponGrabbed' then
  set_absent('promotion', ARGV[2])
  raise_granted(ARGV[3])
  set_absent('discount', ARGV[4])
  return raise_phase('Active')
elseif kind == 'PromotionFinished' then
  set_absent('promotion', ARGV[2])
  set_absent('finishReason', ARGV[3])
  raise_granted(ARGV[4])
  set_absent('finishedAt', ARGV[5])
  return raise_phase('Finished')
end
return redis.error_reply('project: unknown event type ' .. tostring(kind))
