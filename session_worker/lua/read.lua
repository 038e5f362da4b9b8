-- read.lua: the session document, after applying a passed run deadline (SPEC §4).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua (ARGV[1] is "": reads are not de-duplicated).
--
-- Returns false when the session does not exist, else the document JSON with `schedule` as
-- the stored JSON string and `jobs` as job_id -> {client_id, status, result, time_started,
-- time_ended, member}, and run_completed when this read closed the run by its deadline. The
-- caller normalises empty objects.

local s = load_session()
if not s then return false end
CURRENT = s
apply_deadline(s)
save(s)

local jobs = {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local e = cjson.decode(flat[i + 1])
  local st = job_state(s, e)
  jobs[flat[i]] = {client_id = e.c, status = st.s, result = st.x, time_started = st.ts,
                   time_ended = st.te, member = st.member}
end
local doc = {jobs = jobs}
for k, v in pairs(s) do
  if k ~= '_dirty' then doc[k] = v end
end
doc.run_completed = COMPLETED  -- the run this read closed by its deadline (metrics), or nil
return cjson.encode(doc)
