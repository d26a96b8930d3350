-- Stock shards (issue 14): one promotion's stock split over S > 1 shards,
-- each a full copy of the command-side keys under its own hash tag (shard 0:
-- `{ns/name}`, shard i: `{ns/name~i~salt}`), so every function here is
-- atomic on one slot. S = 1 never reaches this file: it is the unsharded
-- promotion, with the functions and keys above unchanged.
--
-- A shard's stock is a set of coupon numbers: `next`..`upto`, the range it
-- grants from, then the sorted, merged ranges in `more` ("lo-hi,lo-hi");
-- `stock` counts them. The grab reads two integers; `more` is parsed only
-- when the current range runs out or stock moves. Numbers 1..N are dealt out
-- at scheduling and only move inside a recorded stock move, so each number
-- is in exactly one place: a shard's ranges, a customer's coupon, or one
-- pending move (moves-out record not yet in the recipient's moves-in).
--
-- Shard state fields beyond the spec of an unsharded promotion:
--   shard, shards      i and S (every grab checks S: a stale map is refused)
--   next, upto, more   the numbers this shard may grant; stock: how many
--   granted            grants made on this shard (a count, not a number)
--   epoch              +1 on every stock change other than a grant (move out,
--                      move in, move done): the sold-out double collect's clock
--   pending            this shard's moves out not yet done
--   moves_seq          names this shard's moves out: "<shard>.<n>"
--   total_granted      shard 0, once finished: the promotion's total
-- Phases: Pending -> Active -> Finished; shard 0 also Active -> Closing.
--
-- The grab answers one string of lines (like seckill_v3_grab, for the same
-- reason: the worker's client parses one item, not two per customer):
--   kind (ok | applied | replayed), now, stock, granted, epoch, pending,
--   phase, discount, then one line per customer:
--   g<n> granted now | a<held "n:ms"> already held | e this shard is empty
--   (the promotion may still have stock) | s sold out | f<reason> finished |
--   c<reason> closing (the window ended on this shard's clock, or shard 0 is
--   Closing: the caller drives the finish) | n not started.
-- Refusals are arrays: { 'unknown' } | { 'stale_map', S } |
-- { 'not_open', publish_ms, now } (Pending past its publish time: the caller
-- starts the promotion and retries).

-- Every field a non-grab shard function reads, in one HMGET (each
-- redis.call is a few microseconds of the Redis thread).
local function shard_of(key)
  local s, v = state_of(key, 'shard', 'stock', 'more', 'epoch', 'pending', 'next', 'upto',
    'total_granted', 'moves_seq')
  if not s then return nil end
  s.shard, s.stock, s.more = tonumber(v[15]), tonumber(v[16]) or 0, v[17]
  s.epoch, s.pending = tonumber(v[18]) or 0, tonumber(v[19]) or 0
  s.next, s.upto, s.total_granted = tonumber(v[20]) or 1, tonumber(v[21]) or 0, tonumber(v[22])
  s.moves_seq = tonumber(v[23]) or 0
  return s
end

-- "1-10,21-30" <-> { {1,10}, {21,30} }
local function parse_ranges(text)
  local r = {}
  for lo, hi in string.gmatch(text or '', '(%d+)-(%d+)') do
    r[#r + 1] = { tonumber(lo), tonumber(hi) }
  end
  return r
end

local function format_ranges(r)
  local parts = {}
  for i = 1, #r do
    if r[i][1] <= r[i][2] then parts[#parts + 1] = r[i][1] .. '-' .. r[i][2] end
  end
  return table.concat(parts, ',')
end

local function ranges_size(r)
  local n = 0
  for i = 1, #r do
    if r[i][1] <= r[i][2] then n = n + r[i][2] - r[i][1] + 1 end
  end
  return n
end

-- Removes the last k numbers of r and answers them as ranges: a donor gives
-- from the top, grants take from the bottom.
local function take_top(r, k)
  local taken = {}
  local i = #r
  while k > 0 and i >= 1 do
    local lo, hi = r[i][1], r[i][2]
    if lo <= hi then
      local n = math.min(k, hi - lo + 1)
      table.insert(taken, 1, { hi - n + 1, hi })
      r[i][2] = hi - n
      k = k - n
    end
    i = i - 1
  end
  return taken
end

-- Sorts ranges, joins those that touch, drops empty ones. Overlaps are kept
-- as they are (they never occur; conservation checks would see them).
local function normalize(r)
  local kept = {}
  for i = 1, #r do
    if r[i][1] <= r[i][2] then kept[#kept + 1] = r[i] end
  end
  table.sort(kept, function(a, b) return a[1] < b[1] end)
  local out = {}
  for _, m in ipairs(kept) do
    local last = out[#out]
    if last and last[2] + 1 == m[1] then
      last[2] = m[2]
    else
      out[#out + 1] = { m[1], m[2] }
    end
  end
  return out
end

-- Every number of the shard as ranges: next..upto first, then `more`.
local function all_numbers(s)
  local r = parse_ranges(s.more)
  table.insert(r, 1, { s.next, s.upto })
  return r
end

-- Stores ranges r as next..upto (the lowest) and more (the rest), with
-- `extra` field/value pairs, in one HSET.
local function store_numbers(state, s, r, extra)
  r = normalize(r)
  local first = table.remove(r, 1) or { 1, 0 }
  s.next, s.upto, s.more = first[1], first[2], format_ranges(r)
  s.stock = (s.upto >= s.next and s.upto - s.next + 1 or 0) + ranges_size(r)
  redis.call('HSET', state, 'next', s.next, 'upto', s.upto, 'more', s.more,
    'stock', s.stock, unpack(extra))
end

-- The grab's one read: only what a grab needs.
local function grab_state(key)
  local v = redis.call('HMGET', key, 'phase', 'shards', 'stock', 'granted', 'epoch', 'pending',
    'publish_ms', 'finish_ms', 'finish_reason', 'next', 'upto', 'discount')
  if not v[1] then return nil end
  return {
    phase = v[1], shards = tonumber(v[2]), stock = tonumber(v[3]), granted = tonumber(v[4]),
    epoch = tonumber(v[5]), pending = tonumber(v[6]), publish_ms = tonumber(v[7]),
    finish_ms = tonumber(v[8]), finish_reason = v[9], next = tonumber(v[10]),
    upto = tonumber(v[11]), discount_text = v[12],
  }
end

-- The batched grab of one shard over args[first..] (customers in arrival
-- order), as the unsharded grab does it (grab.lua): one HMGET of the
-- batch's customers; a holder (or the same customer twice in the batch) is
-- answered its coupon, anyone else gets the next number while the shard has
-- stock; then one HSET of the new holders, one CouponGrabbed version 3 per
-- run of consecutive numbers (a batch that uses up a range and goes on in
-- the next has two), and one HSET of the state. `s` was read by the
-- caller; `kind` heads the reply.
local function grab_core(keys, args, first, s, now, kind)
  local state, customers, stream = keys[1], keys[2], keys[3]
  -- Eight head items, then the i-th customer's line at 8 + i.
  local out = { kind, now, 0, 0, s.epoch, s.pending, s.phase, s.discount_text or '' }
  -- The batch is args[first..]; its i-th customer is args[first - 1 + i].
  local before, count = first - 1, #args - first + 1
  local held = hmget_all(customers, args, first)
  -- What those who hold nothing are told when this shard grants nothing.
  local line
  if s.phase == 'Pending' then
    line = 'n'
  elseif s.phase == 'Finished' then
    line = s.finish_reason == 'SoldOut' and 's' or 'f' .. (s.finish_reason or '')
  elseif s.phase == 'Closing' or now >= s.finish_ms then
    line = 'c' .. (s.phase == 'Closing' and s.finish_reason or 'Expired')
  end
  if line then
    for i = 1, count do
      local h = held[i]
      if h then out[8 + i] = 'a' .. h else out[8 + i] = line end
    end
  else
    -- The hot loop keeps the numbers in locals and turns each coupon number
    -- into text once (Lua 5.1 formats a number with sprintf each time it is
    -- concatenated): about a third of this function's cost per grant.
    local next_n, upto, stock, granted = s.next, s.upto, s.stock, s.granted
    local granted_before = granted
    local at = ':' .. now
    local more_list
    local mine = {}    -- customer -> the coupon granted in this batch
    local writes = {}  -- customer, coupon, ...
    local run = {}     -- the customers of the current run of numbers
    local run_first
    local w, r_n = 0, 0 -- sizes of writes and run
    for i = 1, count do
      local c = args[before + i]
      local h = held[i] or mine[c]
      if h then
        out[8 + i] = 'a' .. h
      elseif stock > 0 then
        if next_n > upto then -- this range is used up: take the next one
          append_grants(stream, run_first, run, now, granted)
          run, r_n = {}, 0
          more_list = more_list or parse_ranges(redis.call('HGET', state, 'more'))
          local r = table.remove(more_list, 1)
          next_n, upto = r[1], r[2]
        end
        if r_n == 0 then run_first = next_n end
        local seq = tostring(next_n)
        local coupon = seq .. at
        mine[c] = coupon
        writes[w + 1], writes[w + 2], w = c, coupon, w + 2
        r_n = r_n + 1
        run[r_n] = c
        next_n, stock, granted = next_n + 1, stock - 1, granted + 1
        out[8 + i] = 'g' .. seq
      else
        out[8 + i] = 'e'
      end
    end
    s.next, s.upto, s.stock, s.granted = next_n, upto, stock, granted
    if granted > granted_before then
      hset_all(customers, writes)
      append_grants(stream, run_first, run, now, granted)
      if more_list then
        redis.call('HSET', state, 'next', next_n, 'upto', upto, 'more',
          format_ranges(more_list), 'stock', stock, 'granted', granted)
      else
        redis.call('HSET', state, 'next', next_n, 'stock', stock, 'granted', granted)
      end
    end
  end
  out[3], out[4] = s.stock, s.granted
  return table.concat(out, '\n')
end

-- seckill_v3_shard_grab: KEYS state, customers, events of one shard.
-- ARGV[1] S as the caller knows it (its home computation used it), ARGV[2..]
-- customers whose home is this shard, in arrival order.
redis.register_function('seckill_v3_shard_grab', function(keys, args)
  local s = grab_state(keys[1])
  if not s then return { 'unknown' } end
  if s.shards ~= tonumber(args[1]) then return { 'stale_map', s.shards } end
  local now = now_ms()
  if s.phase == 'Pending' and now >= s.publish_ms then
    return { 'not_open', s.publish_ms, now }
  end
  return grab_core(keys, args, 2, s, now, 'ok')
end)

-- seckill_v3_shard_plan: KEYS shard map (shard 0's slot). ARGV S, salts
-- "k1,...,k(S-1)", placement (status only). The first plan wins: answers the
-- recorded { count, salts, ready }.
redis.register_function('seckill_v3_shard_plan', function(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then
    redis.call('HSET', keys[1], 'count', args[1], 'salts', args[2], 'ready', '0',
      'placement', args[3] or '')
  end
  return redis.call('HMGET', keys[1], 'count', 'salts', 'ready')
end)

-- seckill_v3_shard_replan: KEYS shard map, shard 0's state (one slot). ARGV
-- S, salts, placement. Before the start only (the shards open after Started,
-- so nothing was granted and no stock moved): replaces the plan and sets
-- ready = 0, so shard 0 cannot start until the caller has scheduled the new
-- shards and set ready again. With S = 1 it deletes the map and shard 0's
-- state: the unsharded schedule registers the promotion afresh. Answers
-- { 'replanned', old S, old salts } | { 'started' } (refused: the shards are
-- locked) | { 'unplanned' } (no map: plan instead).
redis.register_function('seckill_v3_shard_replan', function(keys, args)
  local map, state = keys[1], keys[2]
  local old = redis.call('HMGET', map, 'count', 'salts')
  if not old[1] then return { 'unplanned' } end
  local v = redis.call('HMGET', state, 'phase', 'started')
  if v[2] == '1' or (v[1] and v[1] ~= 'Pending') then return { 'started' } end
  if tonumber(args[1]) == 1 then
    redis.call('DEL', map, state)
  else
    redis.call('HSET', map, 'count', args[1], 'salts', args[2], 'ready', '0',
      'placement', args[3] or '')
  end
  return { 'replanned', old[1], old[2] or '' }
end)

-- seckill_v3_shard_ready: KEYS shard map. Every shard is scheduled: shard 0
-- may now append PromotionStarted.
redis.register_function('seckill_v3_shard_ready', function(keys, _)
  redis.call('HSET', keys[1], 'ready', '1')
  return 'ready'
end)

-- seckill_v3_shard_schedule: KEYS state of one shard. ARGV promotion,
-- discount, coupons, publish_ms, finish_ms, publishTime, finishTime, shard,
-- S, ranges. Answers scheduled | unchanged | updated (a Pending shard, which
-- has granted nothing: spec and numbers rewritten) | locked.
redis.register_function('seckill_v3_shard_schedule', function(keys, args)
  local state = keys[1]
  local s = shard_of(state)
  local result = 'scheduled'
  if s then
    if s.discount == tonumber(args[2]) and s.coupons == tonumber(args[3])
      and s.publish_ms == tonumber(args[4]) and s.finish_ms == tonumber(args[5])
      and s.shard == tonumber(args[8]) and s.shards == tonumber(args[9]) then
      return 'unchanged'
    end
    if s.phase ~= 'Pending' or s.started then return 'locked' end
    result = 'updated'
  end
  redis.call('HSET', state, 'promotion', args[1], 'discount', args[2], 'coupons', args[3],
    'publish_ms', args[4], 'finish_ms', args[5], 'publish_time', args[6],
    'finish_time', args[7], 'phase', 'Pending', 'started', '0', 'granted', '0',
    'shard', args[8], 'shards', args[9], 'epoch', '0', 'pending', '0', 'moves_seq', '0')
  store_numbers(state, {}, parse_ranges(args[10]), {})
  return result
end)

-- Appends the promotion's one PromotionStarted (shard 0) and opens shard 0.
local function start_now(state, stream, s, now)
  local at = rfc3339(now)
  append_json(stream, {
    type = 'PromotionStarted', promotion = s.promotion, discount = s.discount,
    numberOfCoupons = s.coupons, publishTime = s.publish_time, finishTime = s.finish_time,
    startedAt = at, shards = s.shards,
  })
  redis.call('HSET', state, 'started', '1', 'phase', 'Active', 'started_at', at)
  s.started, s.phase, s.started_at = true, 'Active', at
end

-- seckill_v3_shard_start: KEYS state, events, shard map of shard 0. Appends
-- PromotionStarted once every shard is scheduled (`ready`) and shard 0's
-- clock has reached the publish time: the start is decided on one clock.
-- Answers { 'started', startedAt } | { 'not_due', ms_left } | { 'not_ready' }
-- | { 'finished', reason } | { 'unknown' }.
redis.register_function('seckill_v3_shard_start', function(keys, _)
  local state, stream, map = keys[1], keys[2], keys[3]
  local s = shard_of(state)
  if not s then return { 'unknown' } end
  if s.started then return { 'started', s.started_at } end
  if s.phase == 'Finished' then return { 'finished', s.finish_reason } end
  if redis.call('HGET', map, 'ready') ~= '1' then return { 'not_ready' } end
  local now = now_ms()
  if now < s.publish_ms then return { 'not_due', s.publish_ms - now } end
  start_now(state, stream, s, now)
  return { 'started', s.started_at }
end)

-- seckill_v3_shard_open: KEYS state of shard i >= 1. ARGV shard 0's
-- startedAt. Run only once PromotionStarted is durable in shard 0's stream,
-- so no grab of any shard precedes the start. Answers the phase after it.
redis.register_function('seckill_v3_shard_open', function(keys, args)
  local phase = redis.call('HGET', keys[1], 'phase')
  if phase == 'Pending' then
    redis.call('HSET', keys[1], 'phase', 'Active', 'started', '1', 'started_at', args[1])
    return 'Active'
  end
  return phase or 'unknown'
end)

-- seckill_v3_move_out, step 1 of a stock move, on the donor: KEYS state,
-- moves-out, events. ARGV to, at_least, divisor. Takes k = clamp(max(at_least,
-- ceil(stock / divisor)), 1, stock) numbers off the top into the pending
-- record moves-out[<id>] = "<to>|<ranges>|<ms>". Not idempotent: a retry
-- makes a second move, which is recorded and completes like the first.
-- Answers { 'moved', id, ranges, k, stock_left, epoch } | { 'empty', epoch }
-- | { 'closed', phase }.
redis.register_function('seckill_v3_move_out', function(keys, args)
  local state, moves_out, stream = keys[1], keys[2], keys[3]
  local s = shard_of(state)
  if not s then return { 'closed', 'unknown' } end
  if s.phase ~= 'Active' then return { 'closed', s.phase } end
  if s.stock == 0 then return { 'empty', s.epoch } end
  local to = tonumber(args[1])
  local k = math.max(tonumber(args[2]), math.ceil(s.stock / tonumber(args[3])))
  k = math.max(1, math.min(k, s.stock))
  local r = all_numbers(s)
  local taken = format_ranges(take_top(r, k))
  local seq = s.moves_seq + 1
  local id = s.shard .. '.' .. seq
  redis.call('HSET', moves_out, id, to .. '|' .. taken .. '|' .. now_ms())
  s.epoch = s.epoch + 1
  store_numbers(state, s, r, { 'epoch', s.epoch, 'pending', s.pending + 1, 'moves_seq', seq })
  redis.call('XADD', stream, '*', 'type', 'StockMovedOut', 'version', '1', 'move', id,
    'to', to, 'count', k, 'ranges', taken)
  return { 'moved', id, taken, k, s.stock, s.epoch }
end)

-- seckill_v3_move_in, step 2, on the recipient: KEYS state, customers,
-- events, moves-in. ARGV move id, from, ranges, S, customers... Adds the
-- ranges once per move id (HSETNX moves-in: a replay adds nothing), then
-- grants to the customers given, those who waited for this stock, in the same
-- atomic call. Answers the grab's lines headed `applied` or `replayed`.
redis.register_function('seckill_v3_move_in', function(keys, args)
  local state, stream, moves_in = keys[1], keys[3], keys[4]
  local s = grab_state(state)
  if not s then return { 'unknown' } end
  if s.shards ~= tonumber(args[4]) then return { 'stale_map', s.shards } end
  local id, ranges = args[1], args[3]
  local kind = 'replayed'
  if redis.call('HSETNX', moves_in, id, args[2] .. '|' .. ranges) == 1 then
    kind = 'applied'
    s.more = redis.call('HGET', state, 'more')
    local r = all_numbers(s)
    local received = parse_ranges(ranges)
    for _, m in ipairs(received) do r[#r + 1] = m end
    s.epoch = s.epoch + 1
    store_numbers(state, s, r, { 'epoch', s.epoch })
    redis.call('XADD', stream, '*', 'type', 'StockMovedIn', 'version', '1', 'move', id,
      'from', args[2], 'count', ranges_size(received), 'ranges', ranges)
  end
  return grab_core(keys, args, 5, s, now_ms(), kind)
end)

-- seckill_v3_move_done, step 3, on the donor: KEYS state, moves-out. ARGV
-- move id. Run only once the recipient's step 2 is durable. Idempotent.
-- Answers done | unknown (already done, or never made).
redis.register_function('seckill_v3_move_done', function(keys, args)
  if redis.call('HDEL', keys[2], args[1]) == 1 then
    redis.call('HINCRBY', keys[1], 'pending', -1)
    redis.call('HINCRBY', keys[1], 'epoch', 1)
    return 'done'
  end
  return 'unknown'
end)

-- seckill_v3_moves_pending: KEYS moves-out. { id, "to|ranges|ms", ... }
redis.register_function{
  function_name = 'seckill_v3_moves_pending',
  callback = function(keys, _) return redis.call('HGETALL', keys[1]) end,
  flags = { 'no-writes' },
}

-- seckill_v3_shard_collect: KEYS state. { phase, stock, pending, epoch,
-- granted, now, finish_reason, total_granted (-1 until finished) } or
-- { 'unknown' }.
redis.register_function{
  function_name = 'seckill_v3_shard_collect',
  callback = function(keys, _)
    local s = shard_of(keys[1])
    if not s then return { 'unknown' } end
    return { s.phase, s.stock, s.pending, s.epoch, s.granted, now_ms(),
      s.finish_reason or '', s.total_granted or -1 }
  end,
  flags = { 'no-writes' },
}

-- Appends the promotion's one PromotionFinished with the promotion's total.
local function finish_with_total(state, stream, s, reason, total, now)
  local own = s.granted
  s.granted = total
  finish_now(state, stream, s, reason, now)
  s.granted = own
  redis.call('HSET', state, 'total_granted', total)
end

-- The answer of a finish step on a finished shard 0: its reason and the
-- promotion's total.
local function already_finished(s)
  return { 'already_finished', s.finish_reason, s.total_granted or s.granted }
end

-- seckill_v3_finish_soldout, the second collect's part on shard 0: KEYS
-- state, events. ARGV shard 0's epoch in the first collect, the sum of the
-- other shards' granted in the second. Appends PromotionFinished{SoldOut,
-- granted = own + sum} when shard 0 is Active with no stock, no pending move
-- and the same epoch (its second read, atomic with the append). Answers
-- { 'finished', total } | { 'already_finished', reason, total } |
-- { 'closing', reason } | { 'retry' }.
redis.register_function('seckill_v3_finish_soldout', function(keys, args)
  local state, stream = keys[1], keys[2]
  local s = shard_of(state)
  if not s then return { 'retry' } end
  if s.phase == 'Finished' then return already_finished(s) end
  if s.phase == 'Closing' then return { 'closing', s.finish_reason } end
  if s.phase ~= 'Active' or s.stock ~= 0 or s.pending ~= 0 or s.epoch ~= tonumber(args[1]) then
    return { 'retry' }
  end
  local total = s.granted + tonumber(args[2])
  finish_with_total(state, stream, s, 'SoldOut', total, now_ms())
  return { 'finished', total }
end)

-- seckill_v3_finish_begin, phase 1 of Expired/Deleted, on shard 0: KEYS
-- state, events, shard map. ARGV reason. Expired is refused before the
-- finish time on shard 0's clock. A promotion whose publish time passed
-- unstarted gets its PromotionStarted first. Shard 0 stops granting and
-- records the reason (the first finish wins). Answers { 'closing', reason } |
-- { 'already_finished', reason, total } | { 'not_due', ms_left }.
redis.register_function('seckill_v3_finish_begin', function(keys, args)
  local state, stream, map = keys[1], keys[2], keys[3]
  local s = shard_of(state)
  if not s then return { 'unknown' } end
  if s.phase == 'Finished' then return already_finished(s) end
  if s.phase == 'Closing' then return { 'closing', s.finish_reason } end
  local now = now_ms()
  if args[1] == 'Expired' and now < s.finish_ms then return { 'not_due', s.finish_ms - now } end
  if not s.started and now >= s.publish_ms and redis.call('HGET', map, 'ready') == '1' then
    start_now(state, stream, s, now)
  end
  redis.call('HSET', state, 'phase', 'Closing', 'finish_reason', args[1])
  return { 'closing', args[1] }
end)

-- seckill_v3_shard_close, on shard i >= 1: KEYS state. ARGV reason. After it
-- the shard grants nothing; its granted is final. SoldOut is refused while
-- the shard has stock or a pending move (never so after a correct sold-out).
-- Answers { 'closed', reason, granted } | { 'refused', stock, pending }.
redis.register_function('seckill_v3_shard_close', function(keys, args)
  local s = shard_of(keys[1])
  if not s then return { 'unknown' } end
  if s.phase == 'Finished' then return { 'closed', s.finish_reason, s.granted } end
  if args[1] == 'SoldOut' and (s.stock > 0 or s.pending > 0) then
    return { 'refused', s.stock, s.pending }
  end
  redis.call('HSET', keys[1], 'phase', 'Finished', 'finish_reason', args[1],
    'finished_at', rfc3339(now_ms()))
  return { 'closed', args[1], s.granted }
end)

-- seckill_v3_finish_commit, phase 3 on shard 0: KEYS state, events. ARGV the
-- sum of the other shards' granted, each read from its close. Appends the one
-- PromotionFinished of a Closing promotion. Answers { 'finished', total } |
-- { 'already_finished', reason, total } | { 'not_closing', phase }.
redis.register_function('seckill_v3_finish_commit', function(keys, args)
  local state, stream = keys[1], keys[2]
  local s = shard_of(state)
  if not s then return { 'unknown' } end
  if s.phase == 'Finished' then return already_finished(s) end
  if s.phase ~= 'Closing' then return { 'not_closing', s.phase } end
  local total = s.granted + tonumber(args[1])
  finish_with_total(state, stream, s, s.finish_reason, total, now_ms())
  return { 'finished', total }
end)
