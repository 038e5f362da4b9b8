-- delete.lua: remove the session and its run history (SPEC §3, delete; see below for its
-- request records).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
--
-- Returns the reply JSON: ok + detached (the session's job ids, whose records the caller
-- detaches); or not_found, idempotency_mismatch. The session's request records (one key
-- each, this delete's own included) are left to their TTL: a command repeated after the
-- delete gets its first answer and is not applied again (a redelivered create does not
-- bring the session back).

local s, early = open_session(RUN_FIELDS)
if not s then return early end

local detached = redis.call('HKEYS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
CURRENT = nil
publish({event = 'session_deleted'})
return ok('success', s, {detached = detached})
