-- delete.lua: remove the session, its history and its request records (SPEC §3, delete).
--
-- KEYS[1..8], ARGV[1..9]: see _prelude.lua.
--
-- Returns the reply JSON: ok + detached (the session's job ids, whose records the caller
-- detaches); or not_found, idempotency_mismatch. Only this request's own record survives
-- (with its TTL), so a repeated delete answers as the first one did.

local s, early = open_session()
if not s then return early end

local detached = redis.call('HKEYS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
CURRENT = nil
publish({event = 'session_deleted'})
local reply = ok('success', s, {detached = detached})
redis.call('EXPIRE', KEYS[6], REQUEST_TTL)
redis.call('EXPIRE', KEYS[7], REQUEST_TTL)
return reply
