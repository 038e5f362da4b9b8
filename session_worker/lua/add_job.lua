-- add_job.lua: put a job into the session (SPEC §3, add_job).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
-- ARGV[10] job_id
-- ARGV[11] client_id ("" when unknown)
--
-- Returns the reply JSON: ok + added (false when the job was already there), session_tag and
-- job_schedule (the session's schedule, for the job's own record); or not_found,
-- idempotency_mismatch. The job enters as `scheduled`, a member from the next run on.

local s, early = open_session(RUN_FIELDS)
if not s then return early end

local job_id = ARGV[10]
local added = false
if not get_job(job_id) then
  put_job(job_id, new_job(s, ARGV[11]))
  bump_version(s)
  publish({event = 'job_added', job_id = job_id})
  added = true
end
return ok('success', s, {added = added, job_id = job_id, job_schedule = cjson.decode(redis.call('HGET', KEYS[1], 'schedule') or '{}')})
