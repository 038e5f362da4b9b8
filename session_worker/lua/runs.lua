-- runs.lua: run history (SPEC §4), after applying a passed run deadline.
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua (ARGV[1] is "": reads are not de-duplicated).
-- ARGV[10] tag of the one run wanted, or "" for every run kept
--
-- Returns false when the session does not exist, else JSON {"runs": [...]} ascending by tag,
-- each {session_tag, time_start, time_end, status, result, closed, jobs: {job_id: {status,
-- result, time_started, time_ended}}} with member jobs only. A member with no entry of its
-- own never reported in that run: `scheduled`, or `completed`/`aborted` if the run was
-- closed by its deadline or by a newer run. `run_completed` is set when this read closed the
-- current run by its deadline.

local s = load_session()
if not s then return false end
CURRENT = s
apply_deadline(s)
save(s)

local tags = {}
if ARGV[10] ~= '' then
  tags[1] = tonumber(ARGV[10])
else
  for _, t in ipairs(redis.call('HKEYS', KEYS[3])) do tags[#tags + 1] = tonumber(t) end
  table.sort(tags)
end

local all_jobs = redis.call('HGETALL', KEYS[2])
local runs = {}
for _, tag in ipairs(tags) do
  local raw = redis.call('HGET', KEYS[3], string.format('%d', tag))
  if raw then
    local run = cjson.decode(raw)
    local jobs = {}
    local fields = redis.call('ZRANGEBYSCORE', KEYS[5], tag, tag)
    if #fields > 0 then
      local values = call_chunked('HMGET', KEYS[4], fields)
      for i, field in ipairs(fields) do
        if values[i] then
          local st = cjson.decode(values[i])
          local job_id = string.sub(field, string.find(field, ':', 1, true) + 1)
          jobs[job_id] = {status = st.s, result = st.x, time_started = st.ts, time_ended = st.te}
        end
      end
    end
    local aborted = closed_abnormally(run.status, run.closed)
    for i = 1, #all_jobs, 2 do
      local e = cjson.decode(all_jobs[i + 1])
      if e.j <= tag and jobs[all_jobs[i]] == nil then
        jobs[all_jobs[i]] = {status = 'scheduled', result = '', time_started = -1,
                             time_ended = -1}
      end
    end
    if aborted then
      for _, st in pairs(jobs) do
        if st.status ~= 'completed' then
          st.status, st.result, st.time_ended = 'completed', 'aborted', run.time_end
        end
      end
    end
    run.jobs = jobs
    runs[#runs + 1] = run
  end
end
return cjson.encode({runs = runs, run_completed = COMPLETED})
