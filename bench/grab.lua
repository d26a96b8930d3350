-- wrk script: every request is a grab by a customer never seen before in this
-- run (thread number + counter), so each one exercises the full grab script
-- (a new coupon), not the already-granted shortcut.
-- Usage: wrk -s bench/grab.lua URL -- RUN_LABEL
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  prefix = (args[1] or "run") .. "-" .. tostring(tid) .. "-"
  counter = 0
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, '{"customerId":"' .. prefix .. counter .. '"}')
end

-- No response() callback: it would run Lua on every answer and slow wrk down;
-- wrk's own "Non-2xx or 3xx responses" line tells whether all were 200.
