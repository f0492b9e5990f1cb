"""Lua scripts: every multi-key step that must be atomic.  Ownership of a stream entry is checked
with XPENDING inside the script, because XACK takes no consumer argument: a zombie worker that
lost an entry can neither write a chunk or a result for it nor acknowledge it."""

from __future__ import annotations

# KEYS: stream, idempotency key, [target worker's registry hash ('' for none), shared stream,
#       further streams that count toward the model's backlog...]
# ARGV: max_len, payload, request_id, idem_ttl, use_idem('1'/'0')
# -> {1, entry_id, fell_back} queued | {0, ''} queue full | {2, existing_request_id} duplicate
# A push to a worker's own stream (KEYS[1]) goes to the shared stream (KEYS[4]) instead when that
# worker is not 'ready' (draining, or its registry hash expired): nothing is pushed to a stream that
# nobody reads, atomically with the orphan sweep (MOVE_UNDELIVERED) that deletes such streams.
# The queue limit counts KEYS[1], KEYS[4] (when different) and KEYS[5..].
ENQUEUE = """
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {2, existing} end
end
local target = KEYS[1]
local fell = 0
if #KEYS >= 4 and KEYS[3] ~= '' and redis.call('HGET', KEYS[3], 'state') ~= 'ready' then
  target = KEYS[4]
  fell = 1
end
local backlog = redis.call('XLEN', KEYS[1])
if #KEYS >= 4 and KEYS[4] ~= KEYS[1] then backlog = backlog + redis.call('XLEN', KEYS[4]) end
for i = 5, #KEYS do backlog = backlog + redis.call('XLEN', KEYS[i]) end
if backlog >= tonumber(ARGV[1]) then return {0, ''} end
local id = redis.call('XADD', target, '*', 'p', ARGV[2])
if ARGV[5] == '1' then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
return {1, id, fell}
"""

# Move the entries of a worker's own stream that nobody has read yet to the shared stream (payload
# kept, new id at the back), then delete the own stream once it is empty (nothing pending either).
# Runs for a draining worker (by itself, force='1') and for a dead one (by any live worker: only
# when the registry hash is gone).  Entries already delivered stay pending for XAUTOCLAIM.
# KEYS: own stream, its worker's registry hash, shared stream, set of own streams of the model
# ARGV: group, mover consumer, max entries, worker id, force('1'/'0')
# -> {moved, entries left in the own stream} | {-1, 0} the worker is alive
MOVE_UNDELIVERED = """
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then return {-1, 0} end
local moved = 0
local ok, res = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                      'STREAMS', KEYS[1], '>')
local entries = {}
if ok then
  if res and res[1] then entries = res[1][2] end
else  -- no group yet: nothing was ever delivered
  entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[3])
end
for _, e in ipairs(entries) do
  if e[2] and #e[2] > 0 then redis.call('XADD', KEYS[3], '*', unpack(e[2])) end
  if ok then redis.call('XACK', KEYS[1], ARGV[1], e[1]) end
  redis.call('XDEL', KEYS[1], e[1])
  moved = moved + 1
end
local left = redis.call('XLEN', KEYS[1])
if left == 0 and ARGV[5] ~= '1' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[4], ARGV[4])
end
return {moved, left}
"""

_OWNED = """
local function owned(stream, group, id, consumer)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p > 0 and p[1][2] == consumer
end
"""

# KEYS: stream, chunks, replies   ARGV: group, consumer, entry_id, request_id, chunk_json, ttl, reply('1'/'0')
# -> 1 written | 0 fenced (this consumer no longer owns the entry)
EMIT_CHUNK = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'c', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[7] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'r', ARGV[4], 'k', 'c', 'p', ARGV[5])
end
return 1
"""

# KEYS: stream, result, replies   ARGV: group, consumer, entry_id, request_id, result_json, ttl, reply, kind
# -> 1 stored and acknowledged | 2 acknowledged, an earlier result won | 0 fenced
FINISH = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
local stored = redis.call('SET', KEYS[2], ARGV[5], 'NX', 'EX', ARGV[6])
if stored and ARGV[7] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'r', ARGV[4], 'k', ARGV[8], 'p', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if stored then return 1 end
return 2
"""

# KEYS: stream   ARGV: group, consumer, id...   -> ids this consumer no longer owns
RENEW = _OWNED + """
local lost = {}
for i = 3, #ARGV do
  if owned(KEYS[1], ARGV[1], ARGV[i], ARGV[2]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# Hand entries back for immediate reclaim without spending a delivery: the idle time is set far
# past any lease and the delivery count lowered by one (the reclaim adds it back).
# KEYS: stream   ARGV: group, consumer, idle_ms, id...   -> number released
RELEASE = """
local n = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    local count = math.max(p[1][4] - 1, 0)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'RETRYCOUNT', count, 'JUSTID')
    n = n + 1
  end
end
return n
"""

# KEYS: stream, dlq, result, replies
# ARGV: group, consumer, entry_id, request_id, raw_payload, result_json, ttl, reply, reason, deliveries
# -> 1 moved | 0 fenced
DEAD_LETTER = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'p', ARGV[5], 'entry', ARGV[3], 'request_id', ARGV[4],
           'reason', ARGV[9], 'deliveries', ARGV[10], 'consumer', ARGV[2])
if ARGV[4] ~= '' then
  local stored = redis.call('SET', KEYS[3], ARGV[6], 'NX', 'EX', ARGV[7])
  if stored and ARGV[8] == '1' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'r', ARGV[4], 'k', 'e', 'p', ARGV[6])
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# A rollout request (ops.rollout): at most one rollout is requested or runs per namespace.  The lock
# holds the rollout's id with a TTL that the supervisor running it renews, so a rollout whose
# supervisor died stops blocking new ones once the TTL passes.
# KEYS: lock, state   ARGV: rollout id, state_json, lock_ttl_ms
# -> {1, ''} requested | {0, state_json of the rollout that holds the lock}
ROLLOUT_REQUEST = """
if redis.call('GET', KEYS[1]) then return {0, redis.call('GET', KEYS[2]) or ''} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2])
return {1, ''}
"""

# Write a rollout's state, if it is still that rollout's: the state key holds its id, and the lock is
# its own (a final write may also land after the lock passed).  A final write releases the lock and
# adds the state to the history; any other renews the lock.
# KEYS: lock, state, history   ARGV: rollout id, state_json, lock_ttl_ms, final('1'/'0'),
#       expected current phase ('' for any), history length
# -> 1 written | 0 not this rollout's any more, or not in the expected phase
ROLLOUT_WRITE = """
local holder = redis.call('GET', KEYS[1])
if (holder and holder ~= ARGV[1]) or (not holder and ARGV[4] ~= '1') then return 0 end
local cur = redis.call('GET', KEYS[2])
if not cur then return 0 end
local st = cjson.decode(cur)
if st.id ~= ARGV[1] or (ARGV[5] ~= '' and st.phase ~= ARGV[5]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[4] == '1' then
  if holder then redis.call('DEL', KEYS[1]) end
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
end
return 1
"""
