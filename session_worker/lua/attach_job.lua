-- attach_job.lua: point a job's own record at the session it was just added to.
--
-- KEYS[1] the job's record   hash  session_id, session_tag, job_schedule (JSON)
-- KEYS[2] this move's marker  string  the session the job came from (de-duplicates a retry)
-- ARGV[1] session_id
-- ARGV[2] session_tag (integer)
-- ARGV[3] job_schedule JSON
-- ARGV[4] marker TTL, seconds
--
-- Returns the session id the record pointed at before ("" when none). A repeated call with
-- the same marker changes nothing and returns the first answer, so a redelivered add_job
-- never moves the job back after a later move.

local seen = redis.call('GET', KEYS[2])
if seen then return seen end
local previous = redis.call('HGET', KEYS[1], 'session_id') or ''
redis.call('HSET', KEYS[1], 'session_id', ARGV[1], 'session_tag', ARGV[2],
           'job_schedule', ARGV[3])
redis.call('SET', KEYS[2], previous, 'EX', tonumber(ARGV[4]))
return previous
