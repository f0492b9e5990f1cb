"""Lua scripts: every multi-key step that must be atomic.  Ownership of a stream entry is checked
with XPENDING inside the script, because XACK takes no consumer argument: a zombie worker that
lost an entry can neither write a chunk or a result for it nor acknowledge it."""

from __future__ import annotations

# KEYS: stream, idempotency key   ARGV: max_len, payload, request_id, idem_ttl, use_idem('1'/'0')
# -> {1, entry_id} queued | {0, ''} queue full | {2, existing_request_id} duplicate
ENQUEUE = """
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {2, existing} end
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return {0, ''} end
local id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[2])
if ARGV[5] == '1' then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
return {1, id}
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
