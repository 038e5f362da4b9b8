-- _prelude.lua: helpers shared by every session script; the loader (scripts.py) puts this
-- text in front of each script, so each script stays one atomic call.
--
-- Every session script receives the same KEYS, in this order (keys.py, SessionKeys):
--   KEYS[1] meta            hash  session scalars, schedule JSON, counters of the current run
--   KEYS[2] jobs            hash  job_id -> job JSON {c, j, r, s, x, ts, te}
--   KEYS[3] runs            hash  tag -> run JSON (history, bounded by ARGV[6])
--   KEYS[4] run_jobs        hash  "<tag>:<job_id>" -> job state in that run {s, x, ts, te}
--   KEYS[5] run_jobs_index  zset  "<tag>:<job_id>" scored by tag
--   KEYS[6] request         string  this request's record "<fingerprint>|<reply JSON>",
--                                   expiring after ARGV[3] seconds
--   KEYS[7] reply           list    reply list of this request (the caller BLPOPs it)
-- and the same leading ARGV:
--   ARGV[1]  request_id ("" for reads: no de-duplication, no reply push)
--   ARGV[2]  fingerprint of the command (hex)
--   ARGV[3]  request record TTL, seconds
--   ARGV[4]  reply list TTL, seconds (0 = do not push: the caller reads the return value)
--   ARGV[5]  events channel
--   ARGV[6]  runs kept in history
--   ARGV[7]  clock override, seconds ("" = server TIME; tests only)
--   ARGV[8]  project_id
--   ARGV[9]  session_id
--   ARGV[10..] command arguments, named in each script's header.
--
-- Job JSON: c client_id, j first run tag the job is a member of, r tag of the run its state
-- belongs to, s status, x result, ts/te time_started/time_ended. A job whose r is not the
-- current tag is lazily `scheduled` in the current run: starting a run never scans the jobs.
-- Counters in meta (members, done, failed) make "did the run complete?" O(1).
--
-- Every script returns the reply JSON (for reads: the document JSON), with `run_completed`
-- added when the call closed the current run (see COMPLETED). Integers only: every
-- number here is below 2^53 and is written with %d.

local REQUEST_ID = ARGV[1]
local FINGERPRINT = ARGV[2]
local REQUEST_TTL = tonumber(ARGV[3])
local REPLY_TTL = tonumber(ARGV[4])
local CHANNEL = ARGV[5]
local HISTORY = tonumber(ARGV[6])
local PROJECT = ARGV[8]
local SESSION = ARGV[9]

local NOW
if ARGV[7] ~= '' then
  NOW = tonumber(ARGV[7])
else
  NOW = tonumber(redis.call('TIME')[1])
end

local MAX_TAG = 1000000000000  -- 10^12, the bound of every integer (SPEC §2)

local NUMERIC = {
  hold_off = true, session_tag = true, time_start = true, time_end = true,
  time_started = true, time_ended = true, run_timeout = true, version = true,
  created_at = true, members = true, done = true, failed = true, hist_min = true,
}

-- redis.call(command, key, items...) in slices of 1,000 items (Lua's unpack takes a few
-- thousand values at most); the replies of a read concatenated, in order.
local function call_chunked(command, key, items)
  local out = {}
  for i = 1, #items, 1000 do
    local part = redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
    if type(part) == 'table' then
      for _, v in ipairs(part) do out[#out + 1] = v end
    end
  end
  return out
end

-- The fields of the session that start, end, add_job, remove_job and delete read: an
-- HMGET of them costs a fraction of an HGETALL of the whole hash (documents, reads).
-- session_tag comes first: every session has it, so its absence means no session.
local RUN_FIELDS = {'session_tag', 'time_start', 'time_end', 'time_started', 'hold_off',
                    'status', 'result', 'closed', 'members', 'done', 'failed', 'version',
                    'run_timeout', 'hist_min'}

-- The session as a table (numbers converted), or nil when it does not exist; only `fields`
-- when given, else every field.
local function load_session(fields)
  local s = {}
  if fields then
    local values = redis.call('HMGET', KEYS[1], unpack(fields))
    if not values[1] then return nil end
    for i, k in ipairs(fields) do
      local v = values[i]
      if v then
        if NUMERIC[k] then v = tonumber(v) end
        s[k] = v
      end
    end
  else
    local flat = redis.call('HGETALL', KEYS[1])
    if #flat == 0 then return nil end
    for i = 1, #flat, 2 do
      local k, v = flat[i], flat[i + 1]
      if NUMERIC[k] then v = tonumber(v) end
      s[k] = v
    end
  end
  s._dirty = {}
  return s
end

local function set(s, field, value)
  s[field] = value
  s._dirty[field] = true
end

local function save(s)
  local args = {}
  for field in pairs(s._dirty) do
    local v = s[field]
    if type(v) == 'number' then v = string.format('%d', v) end
    args[#args + 1] = field
    args[#args + 1] = v
  end
  if #args > 0 then redis.call('HSET', KEYS[1], unpack(args)) end
  s._dirty = {}
end

local function bump_version(s)
  set(s, 'version', (s.version or 0) + 1)
end

local function publish(event)
  event.project_id = PROJECT
  event.session_id = SESSION
  event.time = NOW
  redis.call('PUBLISH', CHANNEL, cjson.encode(event))
end

-- Jobs ---------------------------------------------------------------------------------

local function get_job(job_id)
  local raw = redis.call('HGET', KEYS[2], job_id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put_job(job_id, e)
  redis.call('HSET', KEYS[2], job_id, cjson.encode(e))
end

local function new_job(s, client_id)
  return {c = client_id or '', j = s.session_tag + 1, r = -1, s = 'scheduled', x = '', ts = -1, te = -1}
end

-- Is the job a member of the session's current run?
local function is_member(s, e)
  return s.status ~= '' and e.j <= s.session_tag
end

-- A run closed by its deadline or by a newer run aborts every member that had not completed.
local function closed_abnormally(status, closed)
  return status == 'completed' and (closed == 'deadline' or closed == 'superseded')
end

-- The job's effective state in the current run: {s, x, ts, te, member}.
local function job_state(s, e)
  local member = is_member(s, e)
  local st = {s = 'scheduled', x = '', ts = -1, te = -1}
  if e.r == s.session_tag then st = {s = e.s, x = e.x, ts = e.ts, te = e.te} end
  if member and st.s ~= 'completed' and closed_abnormally(s.status, s.closed) then
    st = {s = 'completed', x = 'aborted', ts = st.ts, te = s.time_end}
  end
  st.member = member
  return st
end

-- Runs ---------------------------------------------------------------------------------

local function write_run(s)
  if s.session_tag < 1 or s.status == '' then return end
  redis.call('HSET', KEYS[3], string.format('%d', s.session_tag), cjson.encode({
    session_tag = s.session_tag, time_start = s.time_start, time_end = s.time_end,
    status = s.status, result = s.result, closed = s.closed or '',
  }))
end

local function write_run_job(tag, job_id, st)
  local field = string.format('%d', tag) .. ':' .. job_id
  local new = redis.call('HSET', KEYS[4], field, cjson.encode({s = st.s, x = st.x, ts = st.ts, te = st.te}))
  if new == 1 then redis.call('ZADD', KEYS[5], tag, field) end  -- indexed once per run
end

-- Keep the last HISTORY runs; forget per-job entries of evicted runs a bounded batch a call.
local function trim_history(s)
  local extra = redis.call('HLEN', KEYS[3]) - HISTORY
  if extra > 0 then
    -- Tags only go up, nearly always one at a time: drop from the lowest kept tag upwards
    -- (O(1) a run); only when a document raised the tag past a gap, sort them all.
    local tag = math.max(s.hist_min or 0, 1)
    local steps = 0
    while extra > 0 and steps < 64 do
      extra = extra - redis.call('HDEL', KEYS[3], string.format('%d', tag))
      tag, steps = tag + 1, steps + 1
    end
    if extra > 0 then
      local nums = {}
      for i, t in ipairs(redis.call('HKEYS', KEYS[3])) do nums[i] = tonumber(t) end
      table.sort(nums)
      for i = 1, extra do redis.call('HDEL', KEYS[3], string.format('%d', nums[i])) end
      tag = nums[extra + 1]
    end
    set(s, 'hist_min', tag)  -- every run below it is gone
  end
  local min_tag = s.hist_min or 0
  if min_tag > 0 then
    local stale = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. min_tag, 'LIMIT', 0, 256)
    if #stale > 0 then
      redis.call('HDEL', KEYS[4], unpack(stale))
      redis.call('ZREM', KEYS[5], unpack(stale))
    end
  end
end

-- The run this call closed, if any: {session_tag, result, closed}. It is added to the
-- script's return value only (for the caller's metrics), never to the stored or pushed
-- reply, so a repeated command never reports it twice.
local COMPLETED = nil

-- The reply JSON returned to the caller: `reply` plus run_completed when this call closed a run.
local function returned(reply)
  if not COMPLETED then return reply end
  return string.sub(reply, 1, -2) .. ',"run_completed":' .. cjson.encode(COMPLETED) .. '}'
end

-- Complete the current run when every member has completed (only while it is running).
local function recompute(s)
  if s.status ~= 'running' or s.members == 0 or s.done < s.members then return end
  set(s, 'status', 'completed')
  set(s, 'result', s.failed == 0 and 'success' or 'fail')
  set(s, 'closed', 'completed')
  set(s, 'time_end', NOW)
  set(s, 'time_ended', NOW)
  write_run(s)
  COMPLETED = {session_tag = s.session_tag, result = s.result, closed = 'completed'}
  publish({event = 'run_completed', session_tag = s.session_tag, result = s.result,
           closed = 'completed'})
end

-- Close a still running run as failed: its deadline passed, or a newer run replaced it.
local function close_run(s, why)
  set(s, 'status', 'completed')
  set(s, 'result', 'fail')
  set(s, 'closed', why)
  set(s, 'time_end', NOW)
  set(s, 'time_ended', NOW)
  bump_version(s)
  write_run(s)
  COMPLETED = {session_tag = s.session_tag, result = 'fail', closed = why}
  publish({event = 'run_completed', session_tag = s.session_tag, result = 'fail', closed = why})
end

-- When the running run expires (for the sweep's schedule), or nil.
local function deadline_of(s)
  if s.status == 'running' and s.run_timeout > 0 then return s.time_start + s.run_timeout end
  return nil
end

local function apply_deadline(s)
  if s.status == 'running' and s.run_timeout > 0 and NOW - s.time_start >= s.run_timeout then
    close_run(s, 'deadline')
  end
end

-- Requests and replies -----------------------------------------------------------------

-- The session this call loaded; finish() saves its changes together with the reply.
local CURRENT = nil

-- Push the reply for the caller; `behind` keeps a reply already waiting there in front (a
-- refused reuse of the request id must not take the first caller's reply away).
local function push_reply(reply, behind)
  if REQUEST_ID == '' or REPLY_TTL == 0 then return end
  if not behind then redis.call('DEL', KEYS[7]) end
  redis.call('RPUSH', KEYS[7], reply)
  redis.call('EXPIRE', KEYS[7], REPLY_TTL)
end

-- Remember the reply under the request id, push it, return it.
local function finish(reply_table)
  reply_table.request_id = REQUEST_ID
  reply_table.session_id = reply_table.session_id or SESSION
  local reply = cjson.encode(reply_table)
  if CURRENT then save(CURRENT) end
  if REQUEST_ID ~= '' then
    redis.call('SET', KEYS[6], FINGERPRINT .. '|' .. reply, 'EX', REQUEST_TTL)
  end
  push_reply(reply)
  return returned(reply)
end

-- A reply that is pushed but not remembered (nothing was applied, nothing can be repeated).
local function refuse(code, description)
  local reply = cjson.encode({request_id = REQUEST_ID, session_id = SESSION, ok = false,
                              error = {code = code, description = description}})
  push_reply(reply, true)
  return reply
end

-- The stored reply of an earlier call with this request id (pushed again), or nil.
-- `exists` says whether the session exists now. The return value (not what is pushed) adds
-- `repeated`, and `gone` when the session no longer exists (request records outlive a
-- delete, delete.lua), so the caller knows which of its steps outside the slot to redo.
local function repeated(exists)
  if REQUEST_ID == '' then return nil end
  local stored = redis.call('GET', KEYS[6])
  if not stored then return nil end
  local bar = string.find(stored, '|', 1, true)
  if string.sub(stored, 1, bar - 1) ~= FINGERPRINT then
    return refuse('idempotency_mismatch',
      'request id ' .. REQUEST_ID .. ' was already used for a different command')
  end
  local reply = string.sub(stored, bar + 1)
  push_reply(reply)
  if not exists then return string.sub(reply, 1, -2) .. ',"repeated":true,"gone":true}' end
  return string.sub(reply, 1, -2) .. ',"repeated":true}'
end

local function ok(result, s, extra)
  local r = {ok = true, result = result, session_tag = s.session_tag, version = s.version}
  if extra then for k, v in pairs(extra) do r[k] = v end end
  return finish(r)
end

local function fail(code, description)
  return finish({ok = false, error = {code = code, description = description}})
end

local function not_found()
  return refuse('not_found', 'session ' .. SESSION .. ' does not exist')
end

-- Open a session script: nil plus the reply to return, or the loaded session (only
-- `fields`, when given; see load_session).
local function open_session(fields)
  local s = load_session(fields)
  if not s then
    local again = repeated(false)
    if again then return nil, again end
    return nil, not_found()
  end
  local again = repeated(true)
  if again then return nil, again end
  CURRENT = s
  apply_deadline(s)
  return s, nil
end
