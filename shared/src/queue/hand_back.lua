-- Conveyor: hand a stopped worker's jobs back to its queue and deregister the worker.
--
-- Run when one of our apalis workers has stopped (shutdown, or an error it is restarted after).
-- Its in-flight set then holds only jobs whose handlers are gone: unfinished at the shutdown
-- deadline, or lost with the worker. They go to the head of the active list (they were started
-- first) and other workers are woken at once instead of after the orphan timeout. Mirrors the
-- "release everything" branch of apalis-redis's release_leases.lua, plus the deregistration its
-- poll_close intends (it ZREMs the in-flight key name instead of the worker name).
--
-- KEYS[1]: the worker's in-flight set     {queue}:inflight:{worker}
-- KEYS[2]: the active job list            {queue}:active
-- KEYS[3]: the signal list                {queue}:signal
-- KEYS[4]: the workers sorted set         {queue}:workers
-- KEYS[5]: the task metadata prefix       {queue}:meta
-- KEYS[6]: the worker's metadata hash     {queue}:workers:metadata:{worker}
-- ARGV[1]: the worker name
-- ARGV[2]: the queue's wake-up channel
-- Returns: the number of jobs handed back

local jobs = redis.call("smembers", KEYS[1])

for _, job_id in ipairs(jobs) do
    redis.call("lpush", KEYS[2], job_id)
    local meta_key = KEYS[5] .. ":" .. job_id
    redis.call("hset", meta_key, "status", "Pending")
    redis.call("hdel", meta_key, "locked_at", "locked_by")
end

redis.call("del", KEYS[1])
redis.call("zrem", KEYS[4], ARGV[1])
redis.call("del", KEYS[6])

if #jobs > 0 then
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
    redis.call("publish", ARGV[2], "handed-back")
end

return #jobs
