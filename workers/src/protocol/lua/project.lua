-- project: applies one event to the read model of one promotion.
-- KEYS[1] read-model hash of the promotion (seckill:rm:promotion:{ns/name}).
-- ARGV[1] event type, then per type:
--   PromotionStarted:  promotion, discount, numberOfCoupons, publishTime, finishTime, startedAt
--                      [, shards: S of a sharded promotion]
--   CouponGrabbed:     promotion, coupon sequence number (N of couponId ns/name#N), discount
--   PromotionFinished: promotion, reason, granted, finishedAt [, 'sharded']
--   ShardGrabs:        promotion, shard i, the highest shardGranted of a batch of
--                      shard i's grabs (a sharded promotion's, S > 1)
-- Answers the phase the read model is in afterwards.
--
-- Projectors deliver at least once and, across replicas, in any order. Every
-- rule here is therefore monotone, so that applying an event twice, or
-- Finished before Started, or a grab before Started, converges to the state
-- the in-order stream gives:
--   * phase only moves Pending -> Active -> Finished (a grab implies Active);
--   * granted = max(granted, what the event proves was granted);
--   * every other field is written only when absent (events never disagree).
-- A sharded promotion (S > 1, issue 14) has S streams, and its coupon numbers
-- are not in arrival order, so its grabs count per shard instead:
--   * granted:<i> = the highest shardGranted seen from shard i's stream;
--   * grantedShards grows by each raise's delta (so it is the sum of them);
--   * finishedGranted = the Finished total;
--   * granted = max(grantedShards, finishedGranted), kept as the running max
--     of both (each only rises), which is the same number.
-- S = 1 never sends ShardGrabs or the optional arguments: its fields are
-- exactly the unsharded ones.
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
  set_absent('shards', ARGV[8])
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
  if ARGV[6] == 'sharded' then set_absent('finishedGranted', ARGV[4]) end
  return raise_phase('Finished')
elseif kind == 'ShardGrabs' then
  set_absent('promotion', ARGV[2])
  local field = 'granted:' .. ARGV[3]
  local n = tonumber(ARGV[4]) or 0
  local current = tonumber(redis.call('HGET', key, field)) or 0
  if n > current then
    redis.call('HSET', key, field, n)
    raise_granted(redis.call('HINCRBY', key, 'grantedShards', n - current))
  end
  return raise_phase('Active')
end
return redis.error_reply('project: unknown event type ' .. tostring(kind))
