-- snapshot: the promotion's command-side state and Redis' clock, read-only.
-- KEYS[1] state hash.
local s = state_of(KEYS[1])
return snapshot('snapshot', s, now_ms())
