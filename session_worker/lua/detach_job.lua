-- detach_job.lua: mark a job's own record as in no session, if it is in the given one.
--
-- KEYS[1] the job's record  hash  session_id, session_tag, job_schedule (JSON)
-- ARGV[1] session_id the job is leaving
--
-- Returns 1 when the record was detached, 0 when it belongs elsewhere (left untouched).

if redis.call('HGET', KEYS[1], 'session_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'session_id', '', 'session_tag', '0',
           'job_schedule', '{"event":"stop"}')
return 1
