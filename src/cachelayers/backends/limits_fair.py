"""Fair grants for rate limits in Redis: one Lua script that checks a window and a line of waiting processes.

limits' Redis strategies say yes or no to whoever asks first, so across processes the quickest to ask wins
(see the rate-limiting guide, "Fairness across processes"). `RedisFairLine` replaces limits' *granting*
calls for a Redis storage with one script per attempt that, atomically on the server:

* reads the window in limits' own layout (the fixed window's counter, the moving window's list of times, the
  sliding-window counter's two counters), so everything else — window stats, refunds, negative hits,
  ``RateLimiter.window`` — keeps using limits unchanged;
* keeps a *line* next to the window (a hash: per process, the virtual time of its next unit, the calls it
  has waiting, when its entry lapses, its arrival ticket) and grants a call only if the window has room for
  it **plus** for every unit the other waiting processes would be served before it in start-time fair
  queuing order (each process's units take virtual times one after the other; ties go to the earlier
  ticket); so no process can take the units owed to another, whoever asks first;
* stamps with the **server's** clock (``TIME``): the moving window's entries are then in order and its bound
  holds whatever the clients' clocks say;
* answers a refusal with how long until the window should have room for the caller's turn, so a waiting
  process sleeps until then instead of asking again (one call per admission, no window-stats read).

Everything here only stores; the engine (`cachelayers.engines.limiter.admission`) decides when to ask.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from limits.aio.storage import Storage

__all__ = ["FairGrant", "RedisFairLine"]

GRACE_MS: Final = 500
"""How long past its announced return a process's place in the line is kept (then others stop saving units
for it: a process that died or gave up holds nothing for long)."""

_KEYS_KEPT: Final = 10_000  # windows whose Redis keys are remembered (then forgotten all at once)

# KEYS: 1 the line (hash), 2 the window (fixed: counter; moving: list; sliding counter: current counter),
#       3 the sliding counter's previous counter.
# ARGV: 1 strategy code (fw, mw, swc), 2 limit, 3 window seconds, 4 cost, 5 member, 6 calls the member has
#       waiting (this one included), 7 grace in ms.
# Returns "<server time s.micro> <wait ms> <window end ms>": the window end is "-" when refused (granted: the
# end of the fixed window or counter bucket counted in, 0 for the moving window; one string parses fastest).
_GRANT_LUA: Final = """
local code = ARGV[1]
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local member = ARGV[5]
local calls = tonumber(ARGV[6])
local grace = tonumber(ARGV[7])
local t = redis.call('time')
local stamp = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local now = tonumber(stamp)
local now_ms = now * 1000
local exp_ms = expiry * 1000

-- the line: who else waits, and the virtual time of each one's next unit
local vt = 0
local me = nil
local others = {}
local line = redis.call('hgetall', KEYS[1])
for i = 1, #line, 2 do
  local field = line[i]
  if field == '#v' then
    vt = tonumber(line[i + 1])
  elseif field ~= '#n' then
    local a, b, c, d, e = string.match(line[i + 1], '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    local entry = {tonumber(a), tonumber(b), tonumber(c), tonumber(d), tonumber(e)}
    if entry[3] + exp_ms < now_ms then
      redis.call('hdel', KEYS[1], field)  -- gone for a whole window: forgotten
    elseif field == member then
      me = entry
    elseif entry[3] >= now_ms then
      others[#others + 1] = entry  -- lapsed entries are remembered but nothing is kept for them
    end
  end
end
-- A process that arrives, or comes back from idleness, is owed a fair share of one window (it took nothing
-- meanwhile), or as much as the most owed process waiting if that is more; never more than both.
local floor = vt - math.floor(limit / (#others + 1))
for _, o in ipairs(others) do
  if o[2] > 0 and o[1] < floor then floor = o[1] end
end
floor = math.max(0, floor)
local fresh = me == nil
if fresh then
  me = {floor, 0, 0, math.huge, cost}  -- its ticket is drawn when it is written: it loses ties meanwhile
elseif (me[2] <= 0 or me[3] < now_ms) and me[1] < floor then
  me[1] = floor
end
local start = me[1]
local finish = start + cost
local need = cost
for _, o in ipairs(others) do
  if o[2] > 0 and o[1] < finish then
    local n = math.floor((finish - o[1]) / o[5])
    if n * o[5] == finish - o[1] and o[4] > me[4] then n = n - 1 end
    if n > o[2] then n = o[2] end
    if n > 0 then need = need + n * o[5] end
  end
end

-- the window, in limits' layout
local granted = false
local wait = 0
local window_end = 0
if code == 'fw' then
  local count = tonumber(redis.call('get', KEYS[2]) or '0')
  local ttl = redis.call('pttl', KEYS[2])
  if ttl < 0 then count = 0 end
  if need <= limit - count then
    redis.call('incrby', KEYS[2], cost)
    ttl = redis.call('pttl', KEYS[2])
    if ttl < 0 then
      redis.call('pexpire', KEYS[2], exp_ms)
      ttl = exp_ms
    end
    granted = true
    window_end = now_ms + ttl
  elseif ttl < 0 then
    wait = math.ceil(need / limit - 1) * exp_ms
  else
    wait = ttl + math.max(0, math.ceil(need / limit) - 1) * exp_ms
  end
elseif code == 'mw' then
  if need <= limit then
    local entry = redis.call('lindex', KEYS[2], limit - need)
    if entry and tonumber(entry) >= now - expiry then
      wait = (tonumber(entry) + expiry - now) * 1000
    else
      local entries = {}
      for i = 1, cost do entries[i] = stamp end
      for i = 1, #entries, 5000 do
        redis.call('lpush', KEYS[2], unpack(entries, i, math.min(i + 4999, #entries)))
      end
      redis.call('ltrim', KEYS[2], 0, limit - 1)
      redis.call('expire', KEYS[2], expiry)
      granted = true
    end
  else
    local newest = redis.call('lindex', KEYS[2], 0)
    wait = (need - limit) * exp_ms / limit
    if newest then wait = wait + math.max(0, (tonumber(newest) + expiry - now) * 1000) end
  end
else
  local cur_ttl = tonumber(redis.call('pttl', KEYS[2]))
  if cur_ttl > 0 and cur_ttl < exp_ms then
    redis.call('rename', KEYS[2], KEYS[3])
    redis.call('set', KEYS[2], 0, 'PX', cur_ttl + exp_ms)
  end
  local prev = tonumber(redis.call('get', KEYS[3]) or '0')
  local prev_ttl = math.max(0, tonumber(redis.call('pttl', KEYS[3])))
  local cur = tonumber(redis.call('get', KEYS[2]) or '0')
  cur_ttl = math.max(0, tonumber(redis.call('pttl', KEYS[2])))
  local weighted = math.floor(prev * prev_ttl / exp_ms) + cur
  if need <= limit - weighted then
    if redis.call('exists', KEYS[2]) == 1 then
      redis.call('incrby', KEYS[2], cost)
    else
      redis.call('set', KEYS[2], cost, 'PX', exp_ms * 2)
      cur_ttl = exp_ms * 2
    end
    granted = true
    window_end = now_ms + cur_ttl - exp_ms
  else
    -- before the counters turn over (in r ms) only the previous one's weight falls; after, the current one
    -- becomes the previous one and falls in turn
    local r = math.max(0, cur_ttl - exp_ms)
    local free = limit - need - cur
    wait = -1
    if free >= 0 and prev > 0 then
      local x = math.max(0, prev_ttl - (free + 1) * exp_ms / prev) + 1
      if x <= r or cur_ttl == 0 then wait = x end
    end
    if wait < 0 then
      if cur > 0 and limit - need >= 0 then
        wait = math.max(r, r + exp_ms - (limit - need + 1) * exp_ms / cur) + 1
      else
        wait = r + exp_ms
      end
    end
  end
end

local answer
if granted then
  answer = stamp .. ' 0 ' .. string.format('%.3f', window_end)
else
  answer = stamp .. ' ' .. math.ceil(wait) .. ' -'
end
if granted and fresh and #others == 0 and calls <= 1 then
  return answer  -- nobody waits here, nor behind it in its process: the line has nothing to remember
end

-- the caller's place in the line
if fresh then me[4] = redis.call('hincrby', KEYS[1], '#n', 1) end
local due
if granted then
  me[1] = finish
  me[2] = math.max(0, calls - 1)
  due = now_ms + grace
  if start > vt then redis.call('hset', KEYS[1], '#v', start) end
else
  me[2] = calls
  due = now_ms + wait + grace
end
redis.call('hset', KEYS[1], member,
  string.format('%d %d %d %d %d', me[1], me[2], math.floor(due), me[4], cost))
local keep = math.floor(due - now_ms + 2 * exp_ms)
if redis.call('pttl', KEYS[1]) < keep then redis.call('pexpire', KEYS[1], keep) end
return answer
"""


class FairGrant(NamedTuple):
    """The answer of `RedisFairLine.grant`.

    Attributes:
        granted: Whether the units were taken.
        at: The server's time of the call (seconds since the epoch): what the moving window stored.
        wait: Refused: seconds until the window should have room for the caller's turn; 0 when granted.
        window: Granted under the fixed window or the counter: the end of the window (or counter bucket) the
            units were counted in, server time in seconds; 0 for the moving window.
    """

    granted: bool
    at: float
    wait: float
    window: float


class RedisFairLine:
    """Fair, server-timed grants over limits' Redis storage (redis-py implementation, not a cluster).

    Args:
        storage: The limits storage; its Redis client and key prefix are used.
    """

    def __init__(self, storage: Storage) -> None:
        bridge = storage.bridge  # type: ignore[attr-defined]
        self._prefixed = bridge.prefixed_key
        self._script = bridge.get_connection().register_script(_GRANT_LUA)
        self._keys: dict[tuple[str, str], list[str]] = {}

    @staticmethod
    def usable(storage: object) -> bool:
        """Whether ``storage`` is a limits Redis storage the script can run on (one node: not a cluster)."""
        bridge = getattr(storage, "bridge", None)
        return (bridge is not None and type(bridge).__name__ == "RedispyBridge"
                and hasattr(bridge, "get_connection") and hasattr(bridge, "prefixed_key")
                and "Cluster" not in type(storage).__name__)

    async def grant(self, code: str, window_key: str, limit: int, expiry: int, cost: int, member: str,
                    calls: int) -> FairGrant:
        """Take ``cost`` units of a window if it has room for them and for the units owed to earlier waiters.

        Args:
            code: The strategy: ``"fw"``, ``"mw"`` or ``"swc"``.
            window_key: The window's key (unprefixed, as limits' strategies name it).
            limit: Units the window allows.
            expiry: The window's length in seconds.
            cost: Units to take.
            member: Who asks (one process's queue for this window): its place in the line.
            calls: Calls this member has waiting, this one included (what others must leave room for).

        Returns:
            The `FairGrant`.
        """
        keys = self._keys.get((code, window_key))
        if keys is None:
            keys = self._keys_of(code, window_key)
        stamp, wait, end = (await self._script(keys, [code, limit, expiry, cost, member, calls, GRACE_MS])).split()
        if end in (b"-", "-"):
            return FairGrant(False, float(stamp), int(wait) / 1000, 0.0)
        return FairGrant(True, float(stamp), 0.0, float(end) / 1000)

    def _keys_of(self, code: str, window_key: str) -> list[str]:
        prefixed = self._prefixed
        if code == "swc":
            current = prefixed(f"{{{window_key}}}")
            keys = [f"{current}/fair", current, f"{current}/-1"]
        else:
            window = prefixed(window_key)
            keys = [f"{window}/fair", window]
        if len(self._keys) >= _KEYS_KEPT:
            self._keys.clear()
        self._keys[code, window_key] = keys
        return keys
