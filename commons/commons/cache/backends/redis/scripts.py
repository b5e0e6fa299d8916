"""The Lua scripts of the Redis store, shared by every topology.

Each runs on one server; on a cluster, on one slot, the namespace's (:data:`FILL` and
:data:`DRAIN_PAGE` touch entries of other slots: a cluster never runs them). A :class:`Scripts`
registers them with one client; their texts are public because a cluster transaction sends them
with ``EVAL`` (see ``cluster.py``).
"""

from __future__ import annotations

from commons.cache.backends.redis.connection import RedisClient

__all__ = [
    "DELETE_IF_EQUAL",
    "DRAIN_PAGE",
    "ENSURE_GENERATIONS",
    "FILL",
    "INDEX_ADD",
    "KEEP_GENERATIONS",
    "UNREGISTER_IF_DRAINED",
    "Scripts",
]

# Lua: records `member` in the index `index` (a sorted set scored by expiry) until `ttl_ms` from
# `now_ms`, prunes members expired more than `grace_ms` ago and keeps the index alive as long as
# its members. A member's score only ever rises (``GT``, Redis 6.2+): a registry member stands for
# a whole leaf, so a short-lived write must not lower it below the expiry of the leaf's
# longer-lived entries (the pruning would then unregister a leaf that still holds live entries).
_INDEX_ADD_FUNCTIONS = """
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
local function index_add(index, member, ttl_ms, grace_ms, now)
  redis.call('ZADD', index, 'GT', now + ttl_ms, member)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - grace_ms)
  local keep_ms = ttl_ms + grace_ms
  local current = redis.call('PTTL', index)
  if current == -1 or current < keep_ms then
    redis.call('PEXPIRE', index, keep_ms)
  end
end
"""

# One index update (KEYS[1], ARGV[1]: the index and its member; ARGV[2], ARGV[3]: the entry's
# time to live and the members' grace, in ms): on a cluster, where the index and the entry are
# in different slots.
INDEX_ADD = (
    _INDEX_ADD_FUNCTIONS
    + """
index_add(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now_ms())
return 1
"""
)

# Unregisters a drained leaf (KEYS[2]) from its registry (KEYS[1]) unless it, or a registry of its
# own (KEYS[3], a tenant's user leaves), was refilled by a write that raced the invalidation: that
# entry then stays reachable by the next invalidation. All three share the namespace's hash tag.
UNREGISTER_IF_DRAINED = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return 0
  end
end
return redis.call('ZREM', KEYS[1], KEYS[2])
"""

# One page of a leaf, removed atomically on one server: the entries and their index members go
# together, so no failure can leave an entry that no index knows. Bounded by the page size, so
# the server is busy for well under a millisecond per call. The entry keys are not declared: a
# standalone server allows that, and a cluster takes the per-slot path instead.
DRAIN_PAGE = """
local keys = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #keys == 0 then
  return {0, 0}
end
local removed = redis.call('UNLINK', unpack(keys))
redis.call('ZREM', KEYS[1], unpack(keys))
return {removed, redis.call('ZCARD', KEYS[1])}
"""

# Lua: keeps the generations KEYS[first..last] alive at least `keep_ms` (a retired one is not
# made again). Part of a fill: of FILL on one server, of KEEP_GENERATIONS on a cluster.
# A generation that would die before keep_ms is given twice that: re-armed once per keep_ms, not
# by every fill, since Redis announces each PEXPIRE to every process tracking the key (their near
# caches would drop the scope's generations on every miss).
_KEEP_GENERATIONS_ALIVE = """
for i = first, last do
  local current = redis.call('PTTL', KEYS[i])
  if current >= 0 and current < keep_ms then
    redis.call('PEXPIRE', KEYS[i], 2 * keep_ms)
  end
end
"""

# A fill and its index updates, in one script on one server (one command: no transaction).
# KEYS: the entry, its scope's generations (ARGV[5] of them), then the indexes; ARGV: the value,
# its time to live and the index members' grace (ms), the generations its read saw (joined with
# '.'; empty: an unconditional write), the generations' count, then each index's member.
# The entry is stored only while its generations are still the ones its read saw; a missing one
# refuses it too. The generations are kept alive at least as long as the entry, and the indexes
# record it (only when it is stored).
FILL = (
    _INDEX_ADD_FUNCTIONS
    + """
local now = now_ms()
local ttl_ms, grace_ms = tonumber(ARGV[2]), tonumber(ARGV[4])
local keep_ms = ttl_ms + grace_ms
local first, last = 2, 1 + tonumber(ARGV[5])
if ARGV[3] ~= '' then
  local seen = {}
  for i = first, last do
    local value = redis.call('GET', KEYS[i])
    if not value then
      return 0
    end
    seen[#seen + 1] = value
  end
  if table.concat(seen, '.') ~= ARGV[3] then
    return 0
  end
"""
    + _KEEP_GENERATIONS_ALIVE
    + """
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = last + 1, #KEYS do
  index_add(KEYS[i], ARGV[i - last + 5], ttl_ms, grace_ms, now)
end
return 1
"""
)

# On a cluster, a fill's part in the namespace's slot (the entry is in another): its scope's
# generations (KEYS) are kept alive at least ARGV[1] ms.
KEEP_GENERATIONS = (
    """
local keep_ms = tonumber(ARGV[1])
local first, last = 1, #KEYS
"""
    + _KEEP_GENERATIONS_ALIVE
    + """
return 1
"""
)

# The generations of a scope (KEYS), each created with a random value (ARGV) where missing. One
# of another type was written by something else (an operator, another tool): no fill could ever
# be stored under it (its GET fails), so it is replaced, which retires it as an invalidation does.
ENSURE_GENERATIONS = """
local seen = {}
for i = 1, #KEYS do
  local held = redis.pcall('GET', KEYS[i])
  if type(held) == 'table' and held['err'] then
    redis.call('DEL', KEYS[i])
  end
  redis.call('SET', KEYS[i], ARGV[i], 'NX', 'PX', ARGV[#KEYS + 1])
  seen[i] = redis.call('GET', KEYS[i])
end
return table.concat(seen, '.')
"""

DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Scripts:
    """The scripts registered with one client (``EVALSHA``; loaded again if lost)."""

    def __init__(self, client: RedisClient) -> None:
        self.index_add = client.register_script(INDEX_ADD)
        self.fill = client.register_script(FILL)
        self.ensure_generations = client.register_script(ENSURE_GENERATIONS)
        self.delete_if_equal = client.register_script(DELETE_IF_EQUAL)
        self.unregister_if_drained = client.register_script(UNREGISTER_IF_DRAINED)
        self.drain_page = client.register_script(DRAIN_PAGE)
