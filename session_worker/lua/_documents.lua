-- _documents.lua: helpers of the scripts that write whole documents (create, replace,
-- update); the loader (scripts.py) puts this text after _prelude.lua in front of each of
-- them, so the scripts of the hot path (start, end) do not define what they never call.
-- KEYS and ARGV: those of _prelude.lua (KEYS[1..7], ARGV[1..9]); nothing of its own.

local DOC_FIELDS = {'user_id', 'description', 'hold_off', 'session_tag', 'time_start',
                    'time_end', 'time_started', 'time_ended', 'status', 'result', 'run_timeout'}

-- Write the scalar fields present in `doc` (already validated by the caller).
local function apply_fields(s, doc)
  for _, f in ipairs(DOC_FIELDS) do
    if doc[f] ~= nil then set(s, f, doc[f]) end
  end
end

-- Merge per-job fields from a document's `jobs` object; `member_of` is the first run a job
-- new to the session belongs to. Fields not given keep their value (or the new-job default).
-- Call after apply_fields (membership depends on the session's status and tag).
local function merge_jobs(s, jobs, member_of)
  for job_id, given in pairs(jobs) do
    local e = get_job(job_id)
    if not e then
      e = new_job(s, '')
      e.j = member_of
    end
    if e.r ~= s.session_tag then
      e.r, e.s, e.x, e.ts, e.te = s.session_tag, 'scheduled', '', -1, -1
    end
    if given.client_id ~= nil then e.c = given.client_id end
    if given.status ~= nil then e.s = given.status end
    if given.result ~= nil then e.x = given.result end
    if given.time_started ~= nil then e.ts = given.time_started end
    if given.time_ended ~= nil then e.te = given.time_ended end
    put_job(job_id, e)
    -- The current run's history shows the state the document gives its members.
    if is_member(s, e) and s.session_tag >= 1 then write_run_job(s.session_tag, job_id, e) end
  end
end

-- Count members, completed and failed members of the current run from scratch: O(jobs), so
-- only whole-document writes call it.
local function rebuild_counters(s)
  local members, done, failed = 0, 0, 0
  local flat = redis.call('HGETALL', KEYS[2])
  for i = 1, #flat, 2 do
    local st = job_state(s, cjson.decode(flat[i + 1]))
    if st.member then
      members = members + 1
      if st.s == 'completed' then
        done = done + 1
        if st.x ~= 'success' then failed = failed + 1 end
      end
    end
  end
  set(s, 'members', members)
  set(s, 'done', done)
  set(s, 'failed', failed)
end

-- A document may raise the tag but never lower it: the tag names runs, their history and
-- every job's membership, which all assume it only goes up. nil when `doc` is acceptable.
local function lowered_tag(s, doc)
  if doc.session_tag ~= nil and s.session_tag ~= nil and doc.session_tag < s.session_tag then
    return string.format('session_tag may not go down (it is %d, the document says %d)',
                         s.session_tag, doc.session_tag)
  end
  return nil
end

-- The scalars every new session starts from (the caller's document overrides them).
local function fresh_session()
  local s = {_dirty = {}}
  set(s, 'session_tag', 0)
  set(s, 'project_id', PROJECT)
  set(s, 'session_id', SESSION)
  set(s, 'schedule', '{}')
  set(s, 'version', 0)
  set(s, 'created_at', NOW)
  set(s, 'closed', '')
  set(s, 'hist_min', 0)
  set(s, 'members', 0)
  set(s, 'done', 0)
  set(s, 'failed', 0)
  return s
end

-- The running run a document write is about to change: {tag, time_start}, or nil.
local function running_run(s)
  if s.status == 'running' then return {tag = s.session_tag, time_start = s.time_start} end
  return nil
end

-- After a document write: when `was` (running_run before the write) is no longer the
-- session's running run (the document raised session_tag, or set a status other than
-- running or completed), its history entry is closed as superseded, result fail, like a
-- run a newer start replaces; a run never stays `running` in the history.
local function close_replaced_run(s, was)
  if not was then return end
  if s.session_tag == was.tag and (s.status == 'running' or s.status == 'completed') then
    return  -- still the current run; write_run(s) records what the document says
  end
  redis.call('HSET', KEYS[3], string.format('%d', was.tag), cjson.encode({
    session_tag = was.tag, time_start = was.time_start, time_end = NOW,
    status = 'completed', result = 'fail', closed = 'superseded',
  }))
  COMPLETED = {session_tag = was.tag, result = 'fail', closed = 'superseded'}
  publish({event = 'run_completed', session_tag = was.tag, result = 'fail',
           closed = 'superseded'})
end
