-- end.lua: a job reports the end of its part of a run (SPEC §3, end).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
-- ARGV[10] job_id
-- ARGV[11] current_tag ("" = the session's tag)
-- ARGV[12] result: success | fail | aborted
--
-- Returns the reply JSON: ok + result "success" (recorded in the current run) or
-- "out-of-sync" (a late end from an older run, recorded only in that run's history; or an
-- end from a job whose part of the current run closed before it started), or an
-- error: not_found, bad_request (job not in the session, bad result, tag too high),
-- idempotency_mismatch.

local s, early = open_session(RUN_FIELDS)
if not s then return early end

local job_id = ARGV[10]
local result = ARGV[12]
local e = get_job(job_id)
if not e then
  return fail('bad_request', 'job ' .. job_id .. ' is not in session ' .. SESSION)
end
if result ~= 'success' and result ~= 'fail' and result ~= 'aborted' then
  return fail('bad_request', 'result must be one of success, fail, aborted')
end
local tag = s.session_tag
local current = tag
if ARGV[11] ~= '' then current = tonumber(ARGV[11]) end
if current > tag then
  return fail('bad_request', string.format('tag too high: current_tag %d > session_tag %d',
                                           current, tag))
end

if current < tag then
  -- A late end from run `current`: recorded in that run's history entry, nowhere else.
  local field = string.format('%d', current) .. ':' .. job_id
  local in_history = redis.call('HEXISTS', KEYS[3], string.format('%d', current)) == 1
  if in_history and e.j <= current then
    local raw = redis.call('HGET', KEYS[4], field)
    local prev = raw and cjson.decode(raw) or {s = 'scheduled', ts = -1}
    if prev.s ~= 'completed' then
      write_run_job(current, job_id, {s = 'completed', x = result, ts = prev.ts, te = NOW})
      bump_version(s)
      publish({event = 'job_ended_late', job_id = job_id, session_tag = current,
               result = result})
    end
  end
  return ok('out-of-sync', s)
end

-- A job whose part of this run was closed before it ever started (the out-of-sync rule's
-- `aborted` for a job that missed the window) has no result to report for this run.
if e.r == tag and e.s == 'completed' and e.x == 'aborted' and e.ts == -1 then
  return ok('out-of-sync', s)
end

local st = job_state(s, e)
if st.member and s.status == 'running' then
  if st.s ~= 'completed' then set(s, 'done', s.done + 1) end
  local was_failed = st.s == 'completed' and st.x ~= 'success'
  local is_failed = result ~= 'success'
  if is_failed and not was_failed then set(s, 'failed', s.failed + 1) end
  if was_failed and not is_failed then set(s, 'failed', s.failed - 1) end
end
e.r, e.s, e.x, e.ts, e.te = tag, 'completed', result, st.ts, NOW
put_job(job_id, e)
-- The run's history lists its members only (a job added during the run is not one).
if st.member and tag >= 1 then write_run_job(tag, job_id, e) end
bump_version(s)
publish({event = 'job_ended', job_id = job_id, session_tag = tag, result = result})
recompute(s)
return ok('success', s)
