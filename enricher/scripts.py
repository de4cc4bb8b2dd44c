"""The Lua scripts the store runs in Redis, each atomic on one partition's keys (one Redis
Cluster slot). The fenced ones check the partition's epoch first, so a zombie cannot write once
another instance owns the partition."""

# Every script takes KEYS = devices hash, meta hash, expiries sorted set, renews hash, declared
# sorted set (the keys of :class:`enricher.store.PartitionKeys`, in that order).
FENCE = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('FENCED partition epoch is ' .. tostring(epoch) .. ', not ' .. ARGV[1])
end
"""

# Fenced batch write. ARGV = epoch, clock, clock offset, clock before (clock '': leave it;
# clock before '': none), number of records, number of scores, number of devices to drop from
# the expiries, then device, record, ..., then score, device, ..., then the devices to drop,
# then the devices the watermark declared ended, indexed in the declared set by the clock
# offset (the batch's last offset).
WRITE_SCRIPT = (
    FENCE
    + """
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'clock', ARGV[2], 'clock_offset', ARGV[3])
  if ARGV[4] == '' then
    redis.call('HDEL', KEYS[2], 'clock_before')
  else
    redis.call('HSET', KEYS[2], 'clock_before', ARGV[4])
  end
end
local records_end = 7 + 2 * tonumber(ARGV[5])
local scores_end = records_end + 2 * tonumber(ARGV[6])
local unscored_end = scores_end + tonumber(ARGV[7])
for i = 8, records_end, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, records_end)))
end
for i = records_end + 1, scores_end, 1000 do
  redis.call('ZADD', KEYS[3], unpack(ARGV, i, math.min(i + 999, scores_end)))
end
for i = scores_end + 1, unscored_end, 1000 do
  redis.call('ZREM', KEYS[3], unpack(ARGV, i, math.min(i + 999, unscored_end)))
end
for i = unscored_end + 1, #ARGV do
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[i])
end
return tonumber(ARGV[5])
"""
)

# The committed clock, the clock advanced by a batch, and the devices that may have expired
# by its watermark, with their records; then the devices a batch that never committed declared
# ended (their index entry at or past the batch start), with theirs: the batch must settle them
# whatever the limit. Entries before the batch start were written by committed batches and are
# dropped. ARGV = batch start offset, the batch's own clock ('' if it has none), lateness, most
# devices to return. Returns {committed clock or false, clock or false, devices, records,
# pending devices, their records}.
EXPIRING_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[1])
local meta = redis.call('HMGET', KEYS[2], 'clock', 'clock_offset', 'clock_before')
local clock, at, before = meta[1], meta[2], meta[3]
if clock and tonumber(at) >= tonumber(ARGV[1]) then clock = before end
local newest, batch = tonumber(clock), tonumber(ARGV[2])
if batch and (not newest or batch > newest) then newest = batch end
if not newest then return {false, false, {}, {}, {}, {}} end
local watermark = string.format('%.0f', newest - tonumber(ARGV[3]))
local devices = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. watermark, 'LIMIT', 0, ARGV[4])
local records = {}
if #devices > 0 then records = redis.call('HMGET', KEYS[1], unpack(devices)) end
local pending = redis.call('ZRANGEBYSCORE', KEYS[5], ARGV[1], '+inf')
local pending_records = {}
if #pending > 0 then pending_records = redis.call('HMGET', KEYS[1], unpack(pending)) end
return {clock or false, string.format('%.0f', newest), devices, records, pending, pending_records}
"""


# Expiry of quiet devices, a slice at a time, with their renew counters; then a slice of the
# renew counters of devices that have no state (asked for, never seen), from a cursor of its
# own kept in the meta hash. ARGV = epoch, HSCAN
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
    redis.call('ZREM', KEYS[5], items[i])
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
