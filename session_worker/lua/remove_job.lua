-- remove_job.lua: take a job out of the session (SPEC §3, remove_job).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
-- ARGV[10] job_id
--
-- Returns the reply JSON: ok + removed (false when the job was not there: nothing changes);
-- or not_found, idempotency_mismatch. Removing a member of the running run takes it out of
-- the run (and its history): that may complete the run; removing the last member leaves the
-- run open for its deadline.

local s, early = open_session(RUN_FIELDS)
if not s then return early end

local job_id = ARGV[10]
local e = get_job(job_id)
if not e then return ok('success', s, {removed = false, job_id = job_id}) end

local st = job_state(s, e)
if st.member and s.status == 'running' then
  set(s, 'members', s.members - 1)
  if st.s == 'completed' then
    set(s, 'done', s.done - 1)
    if st.x ~= 'success' then set(s, 'failed', s.failed - 1) end
  end
  -- No longer a member of the run: out of its history too (which lists members only).
  local field = string.format('%d', s.session_tag) .. ':' .. job_id
  redis.call('HDEL', KEYS[4], field)
  redis.call('ZREM', KEYS[5], field)
end
redis.call('HDEL', KEYS[2], job_id)
bump_version(s)
publish({event = 'job_removed', job_id = job_id})
recompute(s)
return ok('success', s, {removed = true, job_id = job_id})
