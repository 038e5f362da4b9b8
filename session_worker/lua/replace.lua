-- replace.lua: create the session or overwrite its document (SPEC §3, replace).
--
-- KEYS[1..7], ARGV[1..9]: see _prelude.lua.
-- ARGV[10] scalar fields JSON: every field of _prelude's DOC_FIELDS, validated and defaulted,
--          except session_tag, which keeps its value when not given
-- ARGV[11] schedule JSON (stored as given)
-- ARGV[12] jobs JSON: job_id -> {client_id, status, result, time_started, time_ended}
--
-- Returns the reply JSON: ok + version, created (true when it did not exist), created_at,
-- detached (ids of jobs no longer in the session; their records are the caller's to
-- detach); or bad_request (session_tag lower than the session's), idempotency_mismatch.
-- Run history is kept.
-- A run the document ends while it runs (a higher session_tag, or a status other than running
-- or completed) is closed in the history as superseded, result fail (close_replaced_run).

local s = load_session()
local again = repeated(s ~= nil)
if again then return again end
local created = false
if not s then
  s = fresh_session()
  created = true
end
CURRENT = s
apply_deadline(s)

local doc = cjson.decode(ARGV[10])
local lowered = lowered_tag(s, doc)
if lowered then return fail('bad_request', lowered) end

local jobs = cjson.decode(ARGV[12])
local detached = {}
for _, job_id in ipairs(redis.call('HKEYS', KEYS[2])) do
  if jobs[job_id] == nil then
    detached[#detached + 1] = job_id
  end
end
local was = running_run(s)
apply_fields(s, doc)
close_replaced_run(s, was)
set(s, 'schedule', ARGV[11])
local member_of = s.session_tag + 1
if created and s.status == 'running' then member_of = s.session_tag end
merge_jobs(s, jobs, member_of)
-- (Jobs leave after the first writes: an HDEL takes no memory, and once a script has
-- written anything Redis lets it write on past maxmemory, so a first HDEL would let a whole
-- replace through a Redis that is out of memory.)
call_chunked('HDEL', KEYS[2], detached)
rebuild_counters(s)
bump_version(s)
write_run(s)
recompute(s)
publish({event = 'session_replaced'})
return ok('success', s, {created = created, created_at = s.created_at, detached = detached,
                         deadline = deadline_of(s)})
