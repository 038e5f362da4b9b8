-- create.lua: store a new session document (SPEC §3, create).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
-- ARGV[10] scalar fields JSON: every field of _prelude's DOC_FIELDS, validated and defaulted
-- ARGV[11] schedule JSON (stored as given)
-- ARGV[12] jobs JSON: job_id -> {client_id, status, result, time_started, time_ended}
--
-- Returns the reply JSON: ok + version, created_at; or error conflict (the id exists),
-- idempotency_mismatch. Jobs of a created running session are members of its current run.

local existing = load_session()
local again = repeated(existing ~= nil)
if again then return again end
if existing then
  return fail('conflict', 'session ' .. SESSION .. ' already exists')
end

local s = fresh_session()
CURRENT = s
apply_fields(s, cjson.decode(ARGV[10]))
set(s, 'schedule', ARGV[11])
local member_of = s.session_tag + 1
if s.status == 'running' then member_of = s.session_tag end
merge_jobs(s, cjson.decode(ARGV[12]), member_of)
rebuild_counters(s)
bump_version(s)
write_run(s)
publish({event = 'session_created'})
return ok('success', s, {created_at = s.created_at, deadline = deadline_of(s)})
