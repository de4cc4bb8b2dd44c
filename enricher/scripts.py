"""The Lua scripts the store runs in Redis, each atomic on the keys of one partition (one Redis
Cluster slot), or of several on a single Redis node (the batch write). The fenced ones check
each partition's epoch first, so a zombie cannot write once another instance owns the
partition, and tell a newer owner's epoch (``FENCED``) from an epoch Redis lost (``LOST``:
older than the writer's, or gone)."""

# Why a writer with epoch ``writer`` (a string) may not write where the stored epoch is
# ``epoch`` (nil: none), or nil when it may.
_EPOCH_PROBLEM = """
local function epoch_problem(epoch, writer)
  if epoch == nil or epoch < tonumber(writer) then
    return 'LOST partition epoch is ' .. tostring(epoch) .. ', behind ' .. writer
  end
  if epoch > tonumber(writer) then
    return 'FENCED partition epoch is ' .. tostring(epoch) .. ', not ' .. writer
  end
  return nil
end
"""

# The check the other fenced scripts start with. Every script takes KEYS = devices hash, meta
# hash, expiries sorted set; the fenced ones take the epoch as ARGV[1].
FENCE = (
    _EPOCH_PROBLEM
    + """
local problem = epoch_problem(tonumber(redis.call('HGET', KEYS[2], 'epoch')), ARGV[1])
if problem then return redis.error_reply(problem) end
"""
)

# Take ownership of a partition: an epoch above the stored one and no lower than ARGV[1] (the
# time in ms), so that an owner's epoch stays above a zombie's even after Redis lost the
# stored one. Returns {epoch, the offset the state is complete up to or false}.
TAKE_SCRIPT = """
local stored = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
local epoch = string.format('%.0f', math.max(stored + 1, tonumber(ARGV[1])))
redis.call('HSET', KEYS[2], 'epoch', epoch)
return {epoch, redis.call('HGET', KEYS[2], 'complete')}
"""

# Fenced batch write of one or more partitions: on a single Redis node every partition of a
# batch in one call, on a cluster one call per partition (a script's keys share one slot).
# KEYS: the keys every script takes, for each partition in turn. ARGV, for each partition in
# turn: how many of its arguments follow, then: epoch, the offset the state must be complete
# up to already (else ``LOST``: Redis lost writes), the offset it is complete up to after this
# write, clock, clock offset, clock before (clock '': leave it; clock before '': none), number
# of records, number of scores, then device, record, ..., then score, device, ..., then devices
# to drop from the expiries. Returns for each partition the number of records written, or why
# none was: ``FENCED ...`` or ``LOST ...`` (the other partitions are written all the same).
WRITE_SCRIPT = (
    _EPOCH_PROBLEM
    + """
local function write(devices, meta_key, expiries, at, last)
  local meta = redis.call('HMGET', meta_key, 'epoch', 'complete')
  local problem = epoch_problem(tonumber(meta[1]), ARGV[at + 1])
  if problem then return problem end
  local complete = tonumber(meta[2] or '-1')
  if complete < tonumber(ARGV[at + 2]) then
    return 'LOST partition state is complete up to offset ' .. complete .. ', not '
      .. ARGV[at + 2]
  end
  local clock, clock_before = ARGV[at + 4], ARGV[at + 6]
  if clock == '' then
    redis.call('HSET', meta_key, 'complete', ARGV[at + 3])
  elseif clock_before == '' then
    redis.call('HSET', meta_key, 'complete', ARGV[at + 3], 'clock', clock, 'clock_offset',
      ARGV[at + 5])
    redis.call('HDEL', meta_key, 'clock_before')
  else
    redis.call('HSET', meta_key, 'complete', ARGV[at + 3], 'clock', clock, 'clock_offset',
      ARGV[at + 5], 'clock_before', clock_before)
  end
  local records_end = at + 8 + 2 * tonumber(ARGV[at + 7])
  local scores_end = records_end + 2 * tonumber(ARGV[at + 8])
  for i = at + 9, records_end, 1000 do
    redis.call('HSET', devices, unpack(ARGV, i, math.min(i + 999, records_end)))
  end
  for i = records_end + 1, scores_end, 1000 do
    redis.call('ZADD', expiries, unpack(ARGV, i, math.min(i + 999, scores_end)))
  end
  for i = scores_end + 1, last, 1000 do
    redis.call('ZREM', expiries, unpack(ARGV, i, math.min(i + 999, last)))
  end
  return tonumber(ARGV[at + 7])
end
local replies, at = {}, 1
for k = 1, #KEYS, 3 do
  local last = at + tonumber(ARGV[at])
  replies[#replies + 1] = write(KEYS[k], KEYS[k + 1], KEYS[k + 2], at, last)
  at = last + 1
end
return replies
"""
)

# Fenced wipe of a partition whose state cannot be trusted (no record of how complete it is):
# its devices, expiries and clock go, its epoch stays. ARGV = epoch.
WIPE_SCRIPT = (
    FENCE
    + """
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('HDEL', KEYS[2], 'clock', 'clock_offset', 'clock_before', 'complete')
return 1
"""
)

# The committed clock, the clock advanced by a batch, and the devices that may have expired
# by its watermark, with their records. ARGV = batch start offset, the batch's own clock (''
# if it has none), lateness, most devices to return. Returns {committed clock or false,
# clock or false, devices, records}.
EXPIRING_SCRIPT = """
local meta = redis.call('HMGET', KEYS[2], 'clock', 'clock_offset', 'clock_before')
local clock, at, before = meta[1], meta[2], meta[3]
if clock and tonumber(at) >= tonumber(ARGV[1]) then clock = before end
local newest, batch = tonumber(clock), tonumber(ARGV[2])
if batch and (not newest or batch > newest) then newest = batch end
if not newest then return {false, false, {}, {}} end
local watermark = string.format('%.0f', newest - tonumber(ARGV[3]))
local devices = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. watermark, 'LIMIT', 0, ARGV[4])
local records = {}
if #devices > 0 then records = redis.call('HMGET', KEYS[1], unpack(devices)) end
return {clock or false, string.format('%.0f', newest), devices, records}
"""


# Expiry of quiet devices, a slice at a time, with their renew counters; then a slice of the
# renew counters of devices that have no state (asked for, never seen), from a cursor of its
# own kept in the meta hash. KEYS: as every script, then the renews hash. ARGV = epoch, HSCAN
# cursor, cutoff (epoch ms), slice size, 1-based position of the last event time in a record.
# Returns {next cursor, deleted}.
SWEEP_SCRIPT = (
    FENCE
    + """
local scan = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[4])
local items, deleted, cutoff, at = scan[2], 0, tonumber(ARGV[3]), tonumber(ARGV[5])
for i = 1, #items, 2 do
  if struct.unpack('<i8', items[i + 1], at) < cutoff then
    redis.call('HDEL', KEYS[1], items[i])
    redis.call('HDEL', KEYS[4], items[i])
    redis.call('ZREM', KEYS[3], items[i])
    deleted = deleted + 1
  end
end
local renews = redis.call('HSCAN', KEYS[4], redis.call('HGET', KEYS[2], 'renews_cursor') or '0',
  'COUNT', ARGV[4])
redis.call('HSET', KEYS[2], 'renews_cursor', renews[1])
for i = 1, #renews[2], 2 do
  if redis.call('HEXISTS', KEYS[1], renews[2][i]) == 0 then
    redis.call('HDEL', KEYS[4], renews[2][i])
  end
end
return {scan[1], deleted}
"""
)
