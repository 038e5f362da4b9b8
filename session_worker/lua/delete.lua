-- delete.lua: remove the session and its run history (SPEC §3, delete; see below for its
-- request records).
--
-- KEYS[1..8], ARGV[1..9]: see _prelude.lua.
--
-- Returns the reply JSON: ok + detached (the session's job ids, whose records the caller
-- detaches); or not_found, idempotency_mismatch. The session's request records (this
-- delete's own included) survive it until their TTL: a command repeated after the delete
-- gets its first answer and is not applied again (a redelivered create does not bring the
-- session back).

local s, early = open_session()
if not s then return early end

local detached = redis.call('HKEYS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
CURRENT = nil
publish({event = 'session_deleted'})
local reply = ok('success', s, {detached = detached})
redis.call('EXPIRE', KEYS[6], REQUEST_TTL)
redis.call('EXPIRE', KEYS[7], REQUEST_TTL)
return reply
