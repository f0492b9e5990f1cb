"""Lua scripts: every multi-key step that must be atomic.  Ownership of a stream entry is checked
with XPENDING inside the script, because XACK takes no consumer argument: a zombie worker that
lost an entry can neither write a chunk or a result for it nor acknowledge it."""

from __future__ import annotations

# The sliding minute of an API key's limits: its rate hash (Keys.rate) holds a count per second
# ('r:<sec>' requests, 't:<sec>' tokens), their sums over the last 60 s ('rs', 'ts'), the oldest second
# still counted ('lo') and the requests in flight ('inflight').  slide() drops the seconds that left the
# window and returns the sums; the time is Redis's own (TIME), the same for every gateway replica.
_WINDOW = """
local function now_s()
  return tonumber(redis.call('TIME')[1])
end
local function slide(rk, now)
  local cut = now - 59
  local lo = tonumber(redis.call('HGET', rk, 'lo') or cut)
  if lo < cut then
    if cut - lo > 60 then
      for _, f in ipairs(redis.call('HKEYS', rk)) do
        local p = string.sub(f, 1, 2)
        if p == 'r:' or p == 't:' then redis.call('HDEL', rk, f) end
      end
      redis.call('HSET', rk, 'rs', 0, 'ts', 0)
    else
      for sec = lo, cut - 1 do
        for _, d in ipairs({'r', 't'}) do
          local v = redis.call('HGET', rk, d .. ':' .. sec)
          if v then
            redis.call('HINCRBY', rk, d .. 's', -tonumber(v))
            redis.call('HDEL', rk, d .. ':' .. sec)
          end
        end
      end
    end
  end
  redis.call('HSET', rk, 'lo', cut)
  return tonumber(redis.call('HGET', rk, 'rs') or '0'), tonumber(redis.call('HGET', rk, 'ts') or '0')
end
local function reset_s(rk, d, now)
  for sec = now - 59, now do
    if redis.call('HGET', rk, d .. ':' .. sec) then return sec + 60 - now end
  end
  return 1
end
"""

# Admit a request against its API key (KEYS[7] its record, KEYS[8] its rate hash; Keys.none when auth is off):
# the key must still exist and not be revoked or expired (so a revocation holds at once on every replica),
# and its requests per minute, tokens per minute (ARGV[7] reserved) and requests in flight must stay within
# its limits.  Returns nil when admitted, else the refusal.
_ADMIT = _WINDOW + """
local function admit(kk, rk, reserve, now)
  local rec = redis.call('HMGET', kk, 'sha256', 'revoked_at', 'expires_at', 'rpm', 'tpm', 'max_inflight')
  if not rec[1] then return {3, 'unknown'} end
  if tonumber(rec[2] or '0') > 0 then return {3, 'revoked'} end
  local exp = tonumber(rec[3] or '0')
  if exp > 0 and now >= exp then return {3, 'expired'} end
  local rpm, tpm, maxin = tonumber(rec[4] or '0'), tonumber(rec[5] or '0'), tonumber(rec[6] or '0')
  local rs, ts = slide(rk, now)
  local inflight = tonumber(redis.call('HGET', rk, 'inflight') or '0')
  if rpm > 0 and rs + 1 > rpm then return {4, 'requests', rs, rpm, reset_s(rk, 'r', now)} end
  if tpm > 0 and ts + reserve > tpm then return {4, 'tokens', ts, tpm, reset_s(rk, 't', now)} end
  if maxin > 0 and inflight + 1 > maxin then return {4, 'inflight', inflight, maxin, 1} end
  return nil
end
local function charge(rk, reserve, now)
  redis.call('HINCRBY', rk, 'r:' .. now, 1)
  redis.call('HINCRBY', rk, 'rs', 1)
  redis.call('HINCRBY', rk, 't:' .. now, reserve)
  redis.call('HINCRBY', rk, 'ts', reserve)
  redis.call('HINCRBY', rk, 'inflight', 1)
  redis.call('EXPIRE', rk, 120)
end
"""

# Fair lanes (keys.LANES): a keyed request for the shared stream goes to its key's lane while the key has
# requests in flight there, else to the lane with the fewest keys (then the shortest); lane 0 is the shared
# stream itself.  The lane map (hash) holds 'k:<key id>' its lane, 'n:<key id>' its requests in flight in
# the lanes, 'l:<lane>' how many keys it holds; FINISH and DEAD_LETTER count the request out (field 'l').
_LANE = """
local function pick_lane(map, kid, lanes)
  local cur = redis.call('HGET', map, 'k:' .. kid)
  if cur and tonumber(redis.call('HGET', map, 'n:' .. kid) or '0') > 0 then return tonumber(cur) end
  if cur and redis.call('HINCRBY', map, 'l:' .. cur, -1) <= 0 then redis.call('HDEL', map, 'l:' .. cur) end
  local best, bk, bl = 0, nil, nil
  for i = 0, #lanes - 1 do
    local ki = tonumber(redis.call('HGET', map, 'l:' .. i) or '0')
    local li = redis.call('XLEN', lanes[i + 1])
    if bk == nil or ki < bk or (ki == bk and li < bl) then best, bk, bl = i, ki, li end
  end
  redis.call('HSET', map, 'k:' .. kid, best)
  redis.call('HINCRBY', map, 'l:' .. best, 1)
  return best
end
"""

# Answered entries that a stream still holds so that its group's lag stays true (_SAFE_DEL keeps them in the
# set '<stream>:gc'): not work, so neither the queue limit's recount nor the sweep counts them.
_KEPT = """
local function kept(stream)
  local n = 0
  for _, m in ipairs(redis.call('SMEMBERS', stream .. ':gc')) do
    if redis.call('XRANGE', stream, m, m)[1] then n = n + 1 end
  end
  return n
end
"""

# KEYS: target stream, idempotency key, target worker's registry hash, shared stream (lane 0), the model's
#       byte counter, the total byte counter, the API key's record and rate hash, the lane map, the model's
#       request counter, lanes 1..ARGV[10]-1; an absent key is the name ARGV[9] (Keys.none: a real name, so
#       that an ACL user's key patterns cover it; '' would be refused)
# ARGV: max_len, payload, idempotency record (JSON), idem_ttl, max_bytes (model), max_bytes_total,
#       tokens to reserve, the API key's id, the name of no key, the number of lanes (1: this request is not
#       laned, and no lane is passed), the most requests one key may have in flight in the lanes (0: no limit),
#       the model's number of lanes, a lane's name without its number, a worker stream's name without its id,
#       the set of the model's worker streams (those four only for the recount at the limit), the reservation
#       that ADMIT_KEY made ('<key id>:<second>:<tokens>', on a Redis Cluster, where the key's record and rate
#       hash are on another slot and KEYS[7], KEYS[8] are none; '' otherwise)
# -> {1, entry_id, fell_back, requests in the minute, tokens in the minute, in flight, reset_s} queued
#    | {0, 'entries' | 'bytes' | 'total_bytes' | 'key_share'} full | {2, the stored idempotency record} that
#    key was used before | {3, 'unknown' | 'revoked' | 'expired'} the API key cannot be used
#    | {4, dimension, used, limit, reset_s}
# A push to a worker's own stream (KEYS[1]) goes to the shared stream (KEYS[4]) instead when that
# worker is not 'ready' (draining, or its registry hash expired): nothing is pushed to a stream that
# nobody reads, atomically with the orphan sweep (MOVE_UNDELIVERED) that deletes such streams.
# The queue limit counts the model's requests accepted and not yet answered (KEYS[10], one GET: the work
# does not grow with the number of workers or lanes), like its bytes.  At the limit the script counts the
# entries of the model's streams instead (the shared one, the lanes, every worker's own; undeclared keys, as
# the reply stream in FINISH) and stores that: a counter that drifted (scripts are atomic, so it does not by
# itself; a rolling upgrade from a version without it, or an operator's XDEL, can make it) heals at the
# limit, and no request is refused on a stale count.  The entry carries its size (field
# 'b'), which FINISH and DEAD_LETTER subtract from both byte counters, and from the request counter, when
# they delete it, its key's reservation (field 'q': '<key id>:<second>:<tokens>'), which they settle, and
# 'l' when it is counted in the lane map.
ENQUEUE = _ADMIT + _LANE + _KEPT + """
local none, nl = ARGV[9], tonumber(ARGV[10])
if KEYS[2] ~= none then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {2, existing} end
end
local now = 0
local reserve = tonumber(ARGV[7])
if KEYS[7] ~= none then
  now = now_s()
  local refused = admit(KEYS[7], KEYS[8], reserve, now)
  if refused then return refused end
end
local target = KEYS[1]
local fell = 0
if KEYS[3] ~= none and redis.call('HGET', KEYS[3], 'state') ~= 'ready' then
  target = KEYS[4]
  fell = 1
end
local lanes = {KEYS[4]}
for i = 1, nl - 1 do lanes[i + 1] = KEYS[10 + i] end
local queued = tonumber(redis.call('GET', KEYS[10]) or '0')
if queued >= tonumber(ARGV[1]) then  -- at the limit: count the streams (heals a counter that drifted)
  local function held(st) return redis.call('XLEN', st) - kept(st) end
  queued = held(KEYS[4])
  for i = 1, tonumber(ARGV[12]) - 1 do queued = queued + held(ARGV[13] .. i) end
  for _, w in ipairs(redis.call('SMEMBERS', ARGV[15])) do queued = queued + held(ARGV[14] .. w) end
  if queued > 0 then redis.call('SET', KEYS[10], queued) else redis.call('DEL', KEYS[10]) end
  if queued >= tonumber(ARGV[1]) then return {0, 'entries'} end
end
local size = #ARGV[2]
if tonumber(redis.call('GET', KEYS[5]) or '0') + size > tonumber(ARGV[5]) then return {0, 'bytes'} end
if tonumber(redis.call('GET', KEYS[6]) or '0') + size > tonumber(ARGV[6]) then return {0, 'total_bytes'} end
local laned = target == KEYS[4] and ARGV[8] ~= '' and KEYS[9] ~= none and nl > 1
if laned then
  local map, kid, share = KEYS[9], ARGV[8], tonumber(ARGV[11])
  if share > 0 and tonumber(redis.call('HGET', map, 'n:' .. kid) or '0') >= share then return {0, 'key_share'} end
  target = lanes[pick_lane(map, kid, lanes) + 1]
  redis.call('HINCRBY', map, 'n:' .. kid, 1)
  redis.call('EXPIRE', map, 3600)
end
local fields = {'p', ARGV[2], 'b', size}
local q = ARGV[16]
if KEYS[7] ~= none then
  charge(KEYS[8], reserve, now)
  q = ARGV[8] .. ':' .. now .. ':' .. reserve
end
if q ~= '' then
  fields[#fields + 1] = 'q'
  fields[#fields + 1] = q
  if laned then
    fields[#fields + 1] = 'l'
    fields[#fields + 1] = '1'
  end
end
local id = redis.call('XADD', target, '*', unpack(fields))
redis.call('INCRBY', KEYS[5], size)
redis.call('INCRBY', KEYS[6], size)
redis.call('INCR', KEYS[10])
if KEYS[2] ~= none then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
if KEYS[7] == none then return {1, id, fell} end
local rs, ts = slide(KEYS[8], now)
return {1, id, fell, rs, ts, tonumber(redis.call('HGET', KEYS[8], 'inflight')), reset_s(KEYS[8], 'r', now)}
"""

# Stream ids compared as numbers ("ms-seq").
_ID_LT = """
local function id_lt(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
"""

# Deleting a stream entry without breaking the consumer group's lag, which KEDA scales on (XINFO GROUPS
# 'lag', docs/deployment.md).  Redis answers no lag (NULL) while a deleted id lies at or after the group's
# last-delivered id in a stream that holds other entries, now or once new ones arrive; KEDA's lagCount would
# then read 0 and scale in while work waits.  So the entry at the last-delivered id is deleted only when it
# is the stream's last entry; otherwise it is kept, acknowledged, its id in the stream's set '<stream>:gc',
# and a later delete on the stream removes it once the group has read past it (or it is alone).  Unread
# entries are never deleted.  The lag then stays an integer equal to the unread entries
# (tests/inproc/test_keda_lag.py).
_SAFE_DEL = _ID_LT + """
local function last_delivered(stream, group)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then return nil end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info['last-delivered-id'] end
  end
  return nil
end
local function safe_del(stream, group, id)
  local gc = stream .. ':gc'
  local last = last_delivered(stream, group)
  if last == id and redis.call('XLEN', stream) > 1 then
    redis.call('SADD', gc, id)
  else
    redis.call('XDEL', stream, id)
  end
  if last and redis.call('EXISTS', gc) == 1 then
    local at_last = false
    for _, m in ipairs(redis.call('SMEMBERS', gc)) do  -- the ones the group has read past, first
      if id_lt(m, last) then
        redis.call('XDEL', stream, m)
        redis.call('SREM', gc, m)
      elseif m == last then
        at_last = true
      end
    end
    if at_last and redis.call('XLEN', stream) == 1 then  -- then the one at the last-delivered id, if alone
      redis.call('XDEL', stream, last)
      redis.call('SREM', gc, last)
    end
  end
end
"""

# Move the entries of a worker's own stream that nobody has read yet to the shared stream (payload
# kept, new id at the back), then delete the own stream once it is empty (nothing pending either).
# Runs for a draining worker (by itself, force='1') and for a dead one (by any live worker: only
# when the registry hash is gone).  Entries already delivered stay pending for XAUTOCLAIM.
# KEYS: own stream, its worker's registry hash, shared stream, set of own streams of the model
# ARGV: group, mover consumer, max entries, worker id, force('1'/'0')
# -> {moved, entries left in the own stream} | {-1, 0} the worker is alive
MOVE_UNDELIVERED = _SAFE_DEL + _KEPT + """
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
  if ok then
    redis.call('XACK', KEYS[1], ARGV[1], e[1])
    safe_del(KEYS[1], ARGV[1], e[1])
  else
    redis.call('XDEL', KEYS[1], e[1])  -- no group: no lag to keep
  end
  moved = moved + 1
end
local left = redis.call('XLEN', KEYS[1]) - kept(KEYS[1])
if left == 0 and ARGV[5] ~= '1' then
  redis.call('DEL', KEYS[1], KEYS[1] .. ':gc')
  redis.call('SREM', KEYS[4], ARGV[4])
end
return {moved, left}
"""

# A worker's read when its streams may hold more than it has room for: up to ARGV[3] entries, first from the
# streams before the lanes (its own stream), then one at a time from each lane in turn starting at lane
# ARGV[6] (so that no key's backlog delays another's requests), then from the streams after them.  A stream
# that has its share of the worker's slots running here (running >= share) may not take the last ARGV[5]
# free slots: they stay for lanes below their share.  ARGV[4]: the number of streams before the lanes;
# ARGV[7]: the number of lanes; then, per stream, its requests running here and its share.
# KEYS: streams   ARGV: group, consumer, n, before, keep, first lane, lanes, (running, share) per stream...
# -> {next first lane, {stream index, entry id, fields}...}
PULL = """
local n, before, keep, first, nl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
                                    tonumber(ARGV[6]), tonumber(ARGV[7])
local running, share = {}, {}
for i = 1, #KEYS do
  running[i] = tonumber(ARGV[6 + 2 * i])
  share[i] = tonumber(ARGV[7 + 2 * i])
end
local out, taken = {}, 0
local function read(i, k)
  local got_all = 0
  while k > 0 do
    local can
    if running[i] < share[i] then can = math.min(k, share[i] - running[i]) else can = math.min(k, n - taken - keep) end
    if can <= 0 then break end
    local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', can, 'STREAMS', KEYS[i], '>')
    if not r then break end
    for _, e in ipairs(r[1][2]) do out[#out + 1] = {i, e[1], e[2]} end
    local got = #r[1][2]
    taken, running[i], got_all, k = taken + got, running[i] + got, got_all + got, k - got
    if got < can then break end
  end
  return got_all
end
for i = 1, before do read(i, n - taken) end
local live, nlive, nxt = {}, nl, first
for j = 0, nl - 1 do live[j] = true end
while taken < n and nlive > 0 do
  for s = 0, nl - 1 do
    local j = (first + s) % nl
    if live[j] and taken < n then
      local got
      if nlive == 1 then got = read(before + 1 + j, n - taken) else got = read(before + 1 + j, 1) end
      if got == 0 then
        live[j] = false
        nlive = nlive - 1
      else
        nxt = (j + 1) % nl
      end
    end
  end
end
for i = before + nl + 1, #KEYS do read(i, n - taken) end
return {nxt, out}
"""

_OWNED = """
local function owned(stream, group, id, consumer)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p > 0 and p[1][2] == consumer
end
"""

# Before an entry is deleted: take its size (field 'b', set by ENQUEUE) off the byte counters, count it out
# of the lane map (field 'l'), and settle its API key's reservation (field 'q'): the tokens reserved become
# the tokens used (a refund, or more) in the second they were reserved in, if it is still in the window; one
# request less in flight; the key's usage.
# ns: the key namespace ('' on a Redis Cluster: the key's hashes are on another slot, so the script returns the
# reservation and the caller settles it there with SETTLE); usage: {prompt tokens, completion tokens, '1' when
# the request failed}.
_UNCOUNT = """
local function settle(rate_prefix, usage_prefix, q, usage)
  local kid, sec, reserved = string.match(q, '^([^:]+):(%d+):(%d+)$')
  if not kid then return end
  local rk, uk = rate_prefix .. kid, usage_prefix .. kid
  local used = tonumber(usage[1]) + tonumber(usage[2])
  if tonumber(sec) >= tonumber(redis.call('HGET', rk, 'lo') or '0') and redis.call('HEXISTS', rk, 't:' .. sec) == 1 then
    redis.call('HINCRBY', rk, 't:' .. sec, used - tonumber(reserved))
    redis.call('HINCRBY', rk, 'ts', used - tonumber(reserved))
  end
  if redis.call('HINCRBY', rk, 'inflight', -1) < 0 then redis.call('HSET', rk, 'inflight', 0) end
  redis.call('HINCRBY', uk, 'requests', 1)
  redis.call('HINCRBY', uk, 'prompt_tokens', usage[1])
  redis.call('HINCRBY', uk, 'completion_tokens', usage[2])
  if usage[3] == '1' then redis.call('HINCRBY', uk, 'errors', 1) end
end
local function unlane(map, q)
  local kid = string.match(q, '^([^:]+):')
  if not kid or redis.call('HINCRBY', map, 'n:' .. kid, -1) > 0 then return end
  local lane = redis.call('HGET', map, 'k:' .. kid)
  redis.call('HDEL', map, 'k:' .. kid, 'n:' .. kid)
  if lane and redis.call('HINCRBY', map, 'l:' .. lane, -1) <= 0 then redis.call('HDEL', map, 'l:' .. lane) end
end
local function uncount(stream, id, model_key, total_key, count_key, lane_map, ns, usage)
  local e = redis.call('XRANGE', stream, id, id)
  if not e[1] then return end
  local f = e[1][2]
  local q, laned = nil, false
  for i = 1, #f, 2 do
    if f[i] == 'b' then
      for _, k in ipairs({model_key, total_key}) do
        if redis.call('DECRBY', k, f[i + 1]) <= 0 then redis.call('DEL', k) end
      end
      if redis.call('DECR', count_key) <= 0 then redis.call('DEL', count_key) end
    elseif f[i] == 'q' then
      q = f[i + 1]
    elseif f[i] == 'l' then
      laned = true
    end
  end
  if q then
    if laned then unlane(lane_map, q) end
    if ns ~= '' then
      settle(ns .. ':rate:', ns .. ':usage:', q, usage)
      return nil
    end
  end
  return q  -- not settled here
end
"""

# The gateway's reply stream is named in ARGV, not KEYS: a key given to a script needs read and write
# access under ACLs, and a worker's user may only write the reply streams (docs/security.md).  Like the rate
# and usage keys that settle() builds, it is a key the script touches undeclared.
# KEYS: stream, chunks   ARGV: group, consumer, entry_id, request_id, chunk_json, ttl, replies ('' for none)
# -> 1 written | 0 fenced (this consumer no longer owns the entry)
EMIT_CHUNK = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'c', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[7] ~= '' then
  redis.call('XADD', ARGV[7], 'MAXLEN', '~', '100000', '*', 'r', ARGV[4], 'k', 'c', 'p', ARGV[5])
end
return 1
"""

# KEYS: stream, result, model byte counter, total byte counter, lane map, model request counter
# ARGV: group, consumer, entry_id, request_id, result_json, ttl, replies ('' for none), kind, namespace, prompt tokens,
#       completion tokens, failed ('1'/'0')
# -> {1, q} stored and acknowledged | {2, q} acknowledged, an earlier result won | {0, ''} fenced; q: the entry's
#    API-key reservation when ARGV[9] is '' (Redis Cluster: the caller settles it with SETTLE), else ''
FINISH = _OWNED + _UNCOUNT + _SAFE_DEL + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return {0, ''} end
local stored = redis.call('EXISTS', KEYS[2]) == 0
if stored then  -- the reply first: a command refused mid-script (ACL) leaves no result nobody was told of
  if ARGV[7] ~= '' then
    redis.call('XADD', ARGV[7], 'MAXLEN', '~', '100000', '*', 'r', ARGV[4], 'k', ARGV[8], 'p', ARGV[5])
  end
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[6])
end
local q = uncount(KEYS[1], ARGV[3], KEYS[3], KEYS[4], KEYS[6], KEYS[5], ARGV[9], {ARGV[10], ARGV[11], ARGV[12]})
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
safe_del(KEYS[1], ARGV[1], ARGV[3])
if stored then return {1, q or ''} end
return {2, q or ''}
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

# Take over entries whose lease passed (idle past min_idle_ms), in several streams at once (one round trip
# per reclaim pass, however many streams a worker reads): XPENDING first, so that the previous owner and
# delivery count are known, then XCLAIM (which counts a delivery, and drops from the pending list an entry
# deleted meanwhile).  At most `count` entries are claimed over all the streams; a stream whose cursor is not
# '0-0' may hold more (follow it); a stream without the group is done.
# KEYS: streams   ARGV: group, consumer, min_idle_ms, count, start per stream ('-' or '(id')
# -> per stream {next_start | '0-0', {{entry_id, fields, previous_owner, deliveries}, ...}}
RECLAIM = """
local left = tonumber(ARGV[4])
local res = {}
for i, stream in ipairs(KEYS) do
  local start = ARGV[4 + i]
  if left <= 0 then
    res[i] = {start, {}}
  else
    local ok, p = pcall(redis.call, 'XPENDING', stream, ARGV[1], 'IDLE', ARGV[3], start, '+', left)
    if not ok then
      res[i] = {'0-0', {}}
    else
      local out = {}
      for _, e in ipairs(p) do
        local c = redis.call('XCLAIM', stream, ARGV[1], ARGV[2], ARGV[3], e[1])
        if c[1] then table.insert(out, {e[1], c[1][2], e[2], e[4] + 1}) end
      end
      local nxt = '0-0'
      if #p >= left then nxt = '(' .. p[#p][1] end
      left = left - #out
      res[i] = {nxt, out}
    end
  end
end
return res
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

# Keep a dead-letter stream at most `max` long: trim the oldest first, but never an entry that a
# consumer group of the dead-letter stream (an operator's tool) has not acknowledged or not read yet.
_TRIM_DLQ = """
local function trim_dlq(dlq, max)
  local len = redis.call('XLEN', dlq)
  if len <= max then return end
  local cut = redis.call('XRANGE', dlq, '-', '+', 'COUNT', len - max + 1)
  local minid = cut[#cut][1]
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', dlq)
  if ok then
    for _, g in ipairs(groups) do
      local info = {}
      for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
      if tonumber(info['pending']) > 0 then
        local p = redis.call('XPENDING', dlq, info['name'])
        if id_lt(p[2], minid) then minid = p[2] end
      end
      local unread = redis.call('XRANGE', dlq, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
      if unread[1] and id_lt(unread[1][1], minid) then minid = unread[1][1] end
    end
  end
  redis.call('XTRIM', dlq, 'MINID', minid)
end
"""

# KEYS: stream, dlq, result, model byte counter, total byte counter, lane map, model request counter
# ARGV: group, consumer, entry_id, request_id, raw_payload, result_json, ttl, replies ('' for none), reason, deliveries,
#       max dead letters, namespace ('' on a Redis Cluster, as in FINISH)
# -> {1, q} moved | {0, ''} fenced; q as in FINISH
DEAD_LETTER = _OWNED + _UNCOUNT + _SAFE_DEL + _TRIM_DLQ + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return {0, ''} end
if ARGV[4] ~= '' then
  if redis.call('EXISTS', KEYS[3]) == 0 then  -- the reply first, as in FINISH
    if ARGV[8] ~= '' then
      redis.call('XADD', ARGV[8], 'MAXLEN', '~', '100000', '*', 'r', ARGV[4], 'k', 'e', 'p', ARGV[6])
    end
    redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[7])
  end
end
redis.call('XADD', KEYS[2], '*', 'p', ARGV[5], 'entry', ARGV[3], 'request_id', ARGV[4],
           'reason', ARGV[9], 'deliveries', ARGV[10], 'consumer', ARGV[2])
trim_dlq(KEYS[2], tonumber(ARGV[11]))
local q = uncount(KEYS[1], ARGV[3], KEYS[4], KEYS[5], KEYS[7], KEYS[6], ARGV[12], {'0', '0', '1'})
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
safe_del(KEYS[1], ARGV[1], ARGV[3])
return {1, q or ''}
"""

# On a Redis Cluster an API key's record and rate hash are not on the model's slot, so a keyed request is
# admitted in three steps instead of inside ENQUEUE: ADMIT_KEY on the key's slot (the same checks, and the
# charge), ENQUEUE on the model's with the reservation it made (ARGV[16]), and REFUND if ENQUEUE refuses.
# FINISH and DEAD_LETTER return the reservation, which the worker settles with SETTLE.
# KEYS: the key's record, its rate hash   ARGV: tokens to reserve, the key's id
# -> {1, reservation, requests in the minute, tokens in the minute, in flight, reset_s} | a refusal as ENQUEUE's
ADMIT_KEY = _ADMIT + """
local now = now_s()
local reserve = tonumber(ARGV[1])
local refused = admit(KEYS[1], KEYS[2], reserve, now)
if refused then return refused end
charge(KEYS[2], reserve, now)
local rs, ts = slide(KEYS[2], now)
return {1, ARGV[2] .. ':' .. now .. ':' .. reserve, rs, ts, tonumber(redis.call('HGET', KEYS[2], 'inflight')),
        reset_s(KEYS[2], 'r', now)}
"""

# Undo ADMIT_KEY's charge of a request that ENQUEUE then refused.
# KEYS: the key's rate hash   ARGV: the reservation
REFUND = """
local kid, sec, reserved = string.match(ARGV[1], '^([^:]+):(%d+):(%d+)$')
if not kid then return 0 end
local rk = KEYS[1]
if tonumber(sec) >= tonumber(redis.call('HGET', rk, 'lo') or '0') and redis.call('HEXISTS', rk, 'r:' .. sec) == 1 then
  redis.call('HINCRBY', rk, 'r:' .. sec, -1)
  redis.call('HINCRBY', rk, 'rs', -1)
  redis.call('HINCRBY', rk, 't:' .. sec, -tonumber(reserved))
  redis.call('HINCRBY', rk, 'ts', -tonumber(reserved))
end
if redis.call('HINCRBY', rk, 'inflight', -1) < 0 then redis.call('HSET', rk, 'inflight', 0) end
return 1
"""

# Settle a reservation that FINISH or DEAD_LETTER returned (Redis Cluster), as they do themselves elsewhere.
# KEYS: the key's rate hash, its usage hash   ARGV: reservation, prompt tokens, completion tokens, failed ('1'/'0')
SETTLE = _UNCOUNT + """
local kid = string.match(ARGV[1], '^([^:]+):')
if not kid then return 0 end
settle(string.sub(KEYS[1], 1, #KEYS[1] - #kid), string.sub(KEYS[2], 1, #KEYS[2] - #kid), ARGV[1],
       {ARGV[2], ARGV[3], ARGV[4]})
return 1
"""
