-- update.lua: merge fields into the session document (SPEC §3, update / PATCH).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
-- ARGV[10] scalar fields JSON: only the fields to change, validated
-- ARGV[11] schedule JSON, or "" to keep the schedule
-- ARGV[12] jobs JSON: job_id -> the fields to change (a new job_id adds the job)
--
-- Returns the reply JSON: ok + version; or not_found, bad_request (session_tag lower than
-- the session's), idempotency_mismatch.
-- A run the document ends while it runs (a higher session_tag, or a status other than running
-- or completed) is closed in the history as superseded, result fail (close_replaced_run).

local s, early = open_session()
if not s then return early end

local doc = cjson.decode(ARGV[10])
local lowered = lowered_tag(s, doc)
if lowered then return fail('bad_request', lowered) end
local was = running_run(s)
apply_fields(s, doc)
close_replaced_run(s, was)
if ARGV[11] ~= '' then set(s, 'schedule', ARGV[11]) end
merge_jobs(s, cjson.decode(ARGV[12]), s.session_tag + 1)
rebuild_counters(s)
bump_version(s)
write_run(s)
recompute(s)
publish({event = 'session_updated'})
return ok('success', s, {deadline = deadline_of(s)})
