-- start.lua: a job asks to start the session's run (SPEC §3, start).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
-- ARGV[10] job_id
-- ARGV[11] current_tag: the tag the node holds (integer, 0..10^12)
--
-- Returns the reply JSON: ok + result "success" | "hold-off" | "out-of-sync" with
-- session_tag (and deadline when a new run with a run_timeout began), or an error:
-- not_found (no session), bad_request (job not in the session, tag too high, tag at its
-- bound 10^12), idempotency_mismatch (request id reused for another command).

local s, early = open_session(RUN_FIELDS)
if not s then return early end

local job_id = ARGV[10]
local current = tonumber(ARGV[11])
local e = get_job(job_id)
if not e then
  return fail('bad_request', 'job ' .. job_id .. ' is not in session ' .. SESSION)
end
local tag = s.session_tag
if current > tag then
  return fail('bad_request', string.format('tag too high: current_tag %d > session_tag %d',
                                           current, tag))
end

local in_hold_off = s.time_start ~= -1 and NOW - s.time_start <= s.hold_off
local st = job_state(s, e)

local function start_job_in_current_run()
  e.r, e.s, e.x, e.ts, e.te = tag, 'running', '', NOW, -1
  put_job(job_id, e)
  write_run_job(tag, job_id, e)
  bump_version(s)
  publish({event = 'job_started', job_id = job_id, session_tag = tag})
end

if in_hold_off then
  if current == tag then return ok('hold-off', s) end
  if s.status == 'running' and st.member and st.s == 'scheduled' then
    start_job_in_current_run()
    return ok('success', s)
  end
  if e.r == tag and e.s ~= 'scheduled' then return ok('success', s) end
  return ok('out-of-sync', s)
end

if current < tag then
  -- Outside the window with an old tag: the job missed run `tag`; close its part of it.
  if s.status == 'running' and st.member and st.s == 'scheduled' then
    e.r, e.s, e.x, e.ts, e.te = tag, 'completed', 'aborted', -1, NOW
    put_job(job_id, e)
    write_run_job(tag, job_id, e)
    set(s, 'done', s.done + 1)
    set(s, 'failed', s.failed + 1)
    bump_version(s)
    publish({event = 'job_ended', job_id = job_id, session_tag = tag, result = 'aborted'})
    recompute(s)
  end
  return ok('out-of-sync', s)
end

-- current == tag outside the window: a new run (tags stay within the bound of SPEC §2).
if tag >= MAX_TAG then
  return fail('bad_request', string.format('session_tag %d is at its bound: no new run', tag))
end
if s.status == 'running' then close_run(s, 'superseded') end
tag = tag + 1
set(s, 'session_tag', tag)
set(s, 'time_start', NOW)
set(s, 'time_end', -1)
set(s, 'status', 'running')
set(s, 'result', '')
set(s, 'closed', '')
if s.time_started == -1 then set(s, 'time_started', NOW) end
set(s, 'members', redis.call('HLEN', KEYS[2]))
set(s, 'done', 0)
set(s, 'failed', 0)
if e.j > tag then e.j = tag end
write_run(s)
publish({event = 'run_started', session_tag = tag, job_id = job_id})
start_job_in_current_run()
trim_history(s)
return ok('success', s, {deadline = deadline_of(s)})
