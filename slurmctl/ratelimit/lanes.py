"""Distributed rate limiting with token leases: the maths and the worker-side spender, independent of the backend.

The shared state of one limit is a GCRA ("generic cell rate algorithm") schedule split into ``L`` interleaved
*lanes*: request slots lie on one grid ``1/rate`` apart, and lane ``j`` owns every ``L``-th of them (``tats[j]`` is
the time of its next free slot, in integer microseconds). A worker *leases* ``n`` slots of each of several lanes in
one conditional write — ``tats[j] += n * L/rate`` for each — and spends them locally, one request per slot, at the
slot's time.

Why lanes: a lease of consecutive slots must be spent by one worker at the full rate, which a worker whose request
takes longer than ``1/rate`` cannot do (its slots pass unused). A lane runs at ``rate/L`` (about 1.25/s by default),
so a worker holds as many lanes as its threads can spend, a fast worker all of them, and the lanes of one worker are
spread over the grid. One write renews all of a worker's lanes, so the backend sees a write per worker every lease
span (sized to about 32 of its tokens), not one per request. Each lane records who booked its tail (``owners``), so
the backend knows who holds lanes, of any job on the key, and a worker below its fair share (``fair_share``) books
behind whoever holds more (``plan_lanes``): lanes go to whoever asks without anyone being told how many share. So:

* across all workers, *grants* in any window of ``T`` seconds are at most ``rate * T + 1``: slots are disjoint and
  the lanes' grids interleave, so the sum of all lanes is evenly spaced at ``rate``. The limiter never spends a
  burst of its own: the API's burst (``burst``, declared as the API documents it) is left to absorb the jitter
  between a grant and the request reaching the API. A slot may be used at most ``late_allowance_s`` late (half of
  that room, ``(burst - 1) / rate / 2``), so requests reach the API with at most ``rate * (T + jitter) + 1`` in a
  window, which an API bucket of ``burst`` admits while the jitter stays under ``(burst - 1) / rate``;
* a dead worker's unused slots simply pass (a slot is a moment in time): it costs at most its leases;
* refill needs no background process: it is implied by the clock;
* leases are long, so changes cannot wait for the next lease. Pause, ``slurmctl rate`` and throttling start a new
  *epoch*: every lane restarts at ``anchor`` (a grace period from now) and leases of older epochs are void. Workers
  learn of a new epoch through a cheap *signal* (the limit's row in SQLite, or a small object in the job's manifest
  store next to DynamoDB) that they check about once a second: a change applies everywhere within ~1-2 s;
* a sporadic 429 is not a quota change: the request that got it waits its ``Retry-After`` and is retried, and the
  others go on. ``throttle_strikes`` 429s within a few seconds (by default 3, or 5 % of those seconds' slots when
  more) are: the shared rate halves (at most once per second, not below ``floor``, resuming after ``Retry-After``)
  and recovers linearly over ``recovery_s``.

The worker-side spender is ``slurmctl.ratelimit.leaser.Leaser``. The backend is the truth and the signal only makes
changes fast: a lease is granted in the backend's current epoch
and refused while paused, so a worker that cannot read the signal learns of a change at its next lease at the latest.
Failures are never silent: a failed read is retried soon, logged once per outage and counted
(``ratelimit_<name>_signal_errors`` in the batch's metrics); a signal that cannot be published raises
``SignalNotPublished``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Protocol

US = 1_000_000
LANE_RATE = 1.25  # requests/s of one lane by default: fine enough that a slow worker holds a fair share of lanes
MAX_LANES = 64  # keeps the DynamoDB item near 1.4 KB (two write units per lease; docs/scale.md)
STRIKES = 3  # 429s within a few seconds that mean a quota change (at low rates)
STRIKE_SHARE = 0.05  # 429s on this share of a strike window's slots (at least `throttle_strikes`) are a quota change


def now_us() -> int:
    return int(time.time() * US)


class SignalNotPublished(RuntimeError):
    """A limit's state changed in the backend, but the signal its workers poll could not be written.

    The change stands (the backend grants leases from its current state), so workers that did not hear of it follow
    it at their next lease; publishing again — running the same command again — repairs the signal.
    """


@dataclass
class LimitSpec:
    """A limit as configured: the API's documented rate and burst, adaptive bounds, lease size, lanes."""

    per_second: float
    burst: int = 1  # the API's own bucket: room for jitter, never spent by the limiter itself
    floor: float | None = None  # lowest rate after throttling (default: per_second / 10)
    ceiling: float | None = None  # highest rate `slurmctl rate` may set (default: per_second * 10)
    lease_size: int = 32  # most slots of each lane per lease (a lease is sized to ~32 of its holder's tokens)
    lanes: int | None = None  # interleaved schedules (default: one per LANE_RATE requests/s, at most MAX_LANES)
    horizon_s: float = 60.0  # never book a lease that starts further ahead than this (workers queue behind others)
    late_s: float | None = None  # a slot may still be used this late (default: half the jitter room the burst leaves)
    recovery_s: float = 30.0  # time to climb from floor back to the target after throttling
    signal_s: float = 1.0  # how often a worker checks the limit's signal (pause, rate change, throttling)
    throttle_strikes: int | None = None  # 429s within the strike window that mean the quota changed (default:
    # `strikes_needed`; fewer: sporadic)
    workers: int | None = None  # the job's worker processes, a hint for their first seconds (then the backend tells)

    @property
    def floor_rate(self) -> float:
        return self.floor if self.floor is not None else self.per_second / 10

    @property
    def ceiling_rate(self) -> float:
        return self.ceiling if self.ceiling is not None else self.per_second * 10

    @property
    def lane_count(self) -> int:
        return self.lanes or max(1, min(MAX_LANES, math.ceil(self.per_second / LANE_RATE)))

    @property
    def lane_s(self) -> float:
        """Spacing of one lane's slots at the configured rate."""
        return self.lane_count / self.per_second

    @property
    def jitter_room_s(self) -> float:
        """How much grant-to-request jitter the API's bucket absorbs: ``(burst - 1) / rate``."""
        return max(0.0, (self.burst - 1) / self.per_second)

    @property
    def late_allowance_s(self) -> float:
        """How late a slot may still be used: half the jitter room (the other half is the network's), 2-100 ms."""
        if self.late_s is not None:
            return self.late_s
        return min(0.1, max(0.002, self.jitter_room_s / 2))

    @property
    def strike_window_us(self) -> int:
        """429s this close together count towards a quota change (at least 2 s, at least 8 slots)."""
        return int(max(2.0, 8 / self.per_second) * US)

    @property
    def strikes_needed(self) -> int:
        """429s within the strike window that mean the quota changed: ``throttle_strikes`` when given, else 3 or,
        at high rates, 5 % of the window's slots. A quota cut answers a large share of requests with 429 (halved:
        half of them). Requests that reach the API a few ms late at 500/s (a busy worker's jitter beyond the burst's
        room) draw a few per thousand, and they come in bunches: halving the rate for them three times held a 250/s
        job at 43/s, and with 1 % (10 in 2 s at 500/s) 21 such 429s in a 6,000-request job still halved it once and
        left it at a third of its rate (docs/benchmarks.md)."""
        if self.throttle_strikes is not None:
            return self.throttle_strikes
        return max(STRIKES, math.ceil(STRIKE_SHARE * self.per_second * self.strike_window_us / US))

    @property
    def fair_lanes(self) -> int:
        """A worker's share of the lanes before the backend has told it (``workers`` hinted: lanes / workers)."""
        return max(1, self.lane_count // self.workers) if self.workers else 1

    @property
    def grace_us(self) -> int:
        """How far ahead a new epoch starts: every worker has seen the signal by then, so old leases are over."""
        return int((self.signal_s + 0.25) * US)


@dataclass
class LimitState:
    """What the backend stores for one limit (one DynamoDB item / one SQLite row)."""

    key: str
    tats: list[int]  # µs, next free slot of each lane
    target: float  # requests/s wanted (config or `slurmctl rate`)
    rate: float  # rate right after the last throttling decrease
    changed_at: int  # µs of that decrease
    floor: float
    ceiling: float
    burst: int
    recovery_s: float
    paused: bool = False
    granted: int = 0  # total slots leased (for status)
    throttled: int = 0  # 429s reported (for status)
    epoch: int = 0  # bumped by pause, resume, rate changes and throttling: older leases are void
    anchor: int = 0  # µs at which the current epoch's schedule starts
    strikes: int = 0  # 429s reported since `strike_at` (a quota change once there are `throttle_strikes`)
    strike_at: int = 0  # µs of the first of them
    decreases: int = 0  # times the rate was decreased because of 429s
    owners: list[str] = field(default_factory=list)  # who booked each lane's tail (a Leaser's tag; "": unknown)

    @classmethod
    def new(cls, key: str, spec: LimitSpec, at_us: int) -> "LimitState":
        # Lanes idle (in the past) on one grid: the first slots of all lanes interleave.
        interval = round(US / spec.per_second)
        return cls(key=key, tats=[j * interval for j in range(spec.lane_count)], target=spec.per_second,
                   rate=spec.per_second, changed_at=at_us, floor=spec.floor_rate, ceiling=spec.ceiling_rate,
                   burst=spec.burst, recovery_s=spec.recovery_s)

    @property
    def lanes(self) -> int:
        return len(self.tats)

    def effective_rate(self, at_us: int) -> float:
        """The rate in force now: the last decreased rate, recovering linearly to the target."""
        if self.rate >= self.target:
            return self.target
        climb = (self.target - self.floor) * max(0, at_us - self.changed_at) / (self.recovery_s * US)
        return min(self.target, self.rate + climb)

    def restart(self, anchor_us: int, at_us: int) -> None:
        """A new epoch: every lane starts again at ``anchor``, interleaved at the rate in force."""
        interval = round(US / self.effective_rate(at_us))
        self.epoch += 1
        self.anchor = anchor_us
        self.tats = [anchor_us + j * interval for j in range(self.lanes)]
        self.owners = []  # nobody holds a lane of the new epoch yet

    def own(self, lane: int, owner: str) -> None:
        """Note who booked ``lane``'s tail."""
        if len(self.owners) < self.lanes:
            self.owners += [""] * (self.lanes - len(self.owners))
        self.owners[lane] = owner

    def owner(self, lane: int) -> str:
        return self.owners[lane] if lane < len(self.owners) else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lease:
    start_us: int
    interval_us: int
    count: int
    lane: int = 0
    epoch: int = 0
    spare: bool = False  # held beyond what its holder's callers spend (``plan_lanes``' ``need``)

    @property
    def end_us(self) -> int:
        return self.start_us + self.interval_us * self.count


@dataclass(frozen=True)
class Grant:
    """What one lease call got: a lease per lane (possibly none), the backend calls it took, lanes left free, how
    many processes hold lanes now (the caller included) and the caller's fair share of them (``fair_share``)."""

    leases: tuple[Lease, ...]
    calls: int = 1
    free: int = 0
    holders: int = 0  # 0: not known
    share: int = 0  # 0: not known


@dataclass(frozen=True)
class Wait:
    seconds: float
    paused: bool = False
    calls: int = 1


@dataclass(frozen=True)
class Signal:
    """What workers poll between leases: the epoch, and whether the limit is paused."""

    epoch: int
    paused: bool


def _lane_start(state: LimitState, lane: int, at_us: int, lane_interval: int) -> int:
    """The lane's next slot: its tat, or — an idle lane — its first grid point no earlier than now (an idle limit
    does not burst: the API's burst is the room for jitter)."""
    tat = state.tats[lane]
    if tat >= at_us:
        return tat
    return tat + -(-(at_us - tat) // lane_interval) * lane_interval


def _circular(a: int, b: int, lanes: int) -> int:
    d = abs(a - b) % lanes
    return min(d, lanes - d)


def spread_pick(free: Iterable[int], k: int, around: Iterable[int], lanes: int) -> list[int]:
    """``k`` of the ``free`` lanes, each as far as possible from ``around`` and the ones already picked (ties at
    random): one worker's slots spread evenly over the grid, so a slow caller can spend them."""
    pool = list(free)
    if k <= 0 or not pool:
        return []
    near = list(around)
    dist = {j: min((_circular(j, h, lanes) for h in near), default=lanes) for j in pool}
    picked: list[int] = []
    while len(picked) < k and dist:
        far = max(dist.values())
        lane = random.choice([j for j, d in dist.items() if d == far])
        picked.append(lane)
        del dist[lane]
        for j in dist:
            dist[j] = min(dist[j], _circular(j, lane, lanes))
    return picked


def free_lanes(state: LimitState, at_us: int, taken: Iterable[int] = ()) -> list[int]:
    """Lanes nobody is spending: their next slot is within one lane spacing."""
    interval = max(1, round(US / state.effective_rate(at_us)))
    lane_interval = interval * state.lanes
    skip = set(taken)
    return [j for j in range(state.lanes) if j not in skip and state.tats[j] <= at_us + lane_interval]


SPARE = "~"  # after an owner's tag: a lane it holds beyond what its callers spend (``plan_lanes``' ``need``)


def spare(owner: str) -> bool:
    return owner.endswith(SPARE)


def booked_as(owner: str, lease: "Lease") -> str:
    """The tag a lease's lane is booked under: its owner's, marked ``SPARE`` for a spare lane."""
    return owner + SPARE if lease.spare and owner else owner


def holdings(state: LimitState, at_us: int) -> dict[str, int]:
    """Lanes booked beyond now, by owner: who is spending (or queued to spend) this limit. Lanes of unknown owners
    (booked by a release before owners were recorded, or by a direct backend call) are not counted, nor spare lanes
    (``SPARE``): what a holder spends is its claim, not what it holds while nobody else wants it."""
    out: dict[str, int] = {}
    for lane, tat in enumerate(state.tats):
        owner = state.owner(lane)
        if tat > at_us and owner and not spare(owner):
            out[owner] = out.get(owner, 0) + 1
    return out


def fair_share(lanes: int, others: Iterable[int]) -> int:
    """A caller's fair share when other holders hold ``others`` lanes (max-min fairness, by water-filling): holders
    below an equal share are taken to want no more (a process that cannot spend more holds only what it can), and
    the rest is divided equally among the others and the caller. A holder below that share because it lost lanes
    queues for its own share at its next renewal, so nobody is starved by being taken for content."""
    left, n = lanes, 1
    counts = sorted(others)
    n += len(counts)
    for count in counts:
        if count >= left // n:
            break
        left, n = left - count, n - 1
    return max(1, left // n)


def share_of(state: LimitState, at_us: int, owner: str = "") -> tuple[int, int]:
    """(processes holding lanes, ``owner`` included; ``owner``'s fair share of the lanes)."""
    owned = holdings(state, at_us)
    owned.pop(owner, None)
    return len(owned) + 1, fair_share(state.lanes, owned.values())


def plan_lanes(state: LimitState, n: int, at_us: int, horizon_s: float, *, renew: Mapping[int, int] | None = None,
               hold: Iterable[int] = (), want: int = 1, must: int = 1, owner: str = "",
               share: bool = False, need: int | None = None) -> list[Lease] | Wait:
    """The leases (``n`` slots of each lane) one call gets, so that the caller holds ``want`` lanes in all.

    ``renew``: lanes whose lease is running out (lane -> that lease's end): each continues back to back while nobody
    booked behind it (the lane's tat is still that end), as far as ``want`` allows — beyond it, lanes are dropped.
    ``hold``: lanes the caller holds and is not renewing. Then free lanes are added, spread away from the caller's
    others; if the caller would still hold fewer than ``must`` lanes, it queues on the lanes free soonest (within the
    horizon; otherwise it is told how long to wait). An empty list: nothing to add right now.

    ``share``: ``must`` is at least the caller's fair share (``fair_share``, at most ``want``), and it queues first
    behind the lanes of holders above that share. Whoever holds more than their share keeps it while nobody
    else wants it; once someone books behind one of those lanes, its holder cannot renew it (its lease ends where
    the newcomer's starts). So lanes go to whoever asks, from every process and job on the key, without anyone
    knowing how many share it: the backend's owner of each lane's tail tells.

    ``need`` (default ``want``): the lanes the caller's callers spend. Beyond them, up to ``want``, it takes only free
    lanes and holds them as *spare* (``Lease.spare``, booked as ``owner`` + ``SPARE``): more slots than its callers
    use make a caller ready between two of them wait less (a sync thread calling every 200 ms, on the 2 lanes of a
    100/s limit its pace needs, took 3.1 tokens/s where it could 5). Spare lanes are no claim: the fair share counts
    only what each holder needs, and whoever queues for its share books behind spare lanes first.
    """
    if state.paused:
        return Wait(0.5, paused=True)
    interval = max(1, round(US / state.effective_rate(at_us)))
    lane_interval = interval * state.lanes
    starts = {j: _lane_start(state, j, at_us, lane_interval) for j in range(state.lanes)}
    latest = at_us + int(horizon_s * US)
    held = set(hold)
    renew = dict(renew or {})
    chosen: list[int] = []
    for lane, end in sorted(renew.items(), key=lambda kv: kv[1]):
        if len(held) + len(chosen) >= want:
            break
        if lane < state.lanes and state.tats[lane] == end and starts[lane] <= latest:
            chosen.append(lane)
    taken = held | set(renew) | set(chosen)
    free = [j for j in free_lanes(state, at_us, taken) if starts[j] <= latest]
    chosen += spread_pick(free, want - len(held) - len(chosen), held | set(chosen), state.lanes)
    owned = holdings(state, at_us)
    owned.pop(owner, None)
    fair = fair_share(state.lanes, owned.values())
    need = want if need is None else min(need, want)
    if share:
        must = max(must, min(need, fair))
    if len(held) + len(chosen) < must:
        rest = [j for j in range(state.lanes) if j not in taken and j not in chosen] or \
            [j for j in range(state.lanes) if j not in chosen]
        queue = sorted(rest, key=lambda j: starts[j])
        within = [j for j in queue if starts[j] <= latest]
        if not within and not chosen:
            return Wait((starts[queue[0]] - latest) / US)
        chosen += _queue_behind(state, within, must - len(held) - len(chosen), owned, fair, owner)
    # The caller's needed lanes stay needed (those it booked as needed come first), then renewals, then new ones;
    # beyond its need, spare.
    chosen.sort(key=lambda j: not (owner and state.owner(j) == owner))
    needed = max(0, need - len(held))
    return [Lease(starts[j], lane_interval, n, j, state.epoch, spare=i >= needed) for i, j in enumerate(chosen)]


def _queue_behind(state: LimitState, lanes: list[int], k: int, owned: Mapping[str, int], fair: int,
                  owner: str = "") -> list[int]:
    """``k`` of ``lanes`` (soonest first) to book behind: first spare ones (held beyond their holder's need, not
    ours), soonest first; then those of holders above their fair share, no more of
    each one's than its surplus (so one call moves the lanes a newcomer needs, from whoever has too many), at random
    among the soonest ``2k`` of them; then, with more holders than lanes (lanes are time-shared), any, at random.
    Random: many processes queueing at once (64 sharing 32 lanes) planned the same lane, and on DynamoDB all but one
    of their conditional writes failed, again and again. Among the soonest: a lane just renewed for 25 s is a long
    wait (fair shares took twice as long to settle)."""
    picked = [j for j in lanes if spare(state.owner(j)) and state.owner(j) != owner + SPARE][:k]
    surplus = {holder: count - fair for holder, count in owned.items() if count > fair}
    over = [j for j in lanes if surplus.get(state.owner(j), 0) > 0 and j not in picked]
    soon = over[: 2 * k]
    for lane in random.sample(soon, len(soon)) + over[2 * k:]:
        if len(picked) < k and surplus[state.owner(lane)] > 0:
            surplus[state.owner(lane)] -= 1
            picked.append(lane)
    rest = [j for j in lanes if j not in picked]
    return picked + random.sample(rest, len(rest))[: k - len(picked)]


def throttled_state(state: LimitState, at_us: int, retry_after_s: float | None, grace_us: int, *,
                    strikes: int = 1, window_us: int = US) -> bool:
    """Apply a 429 to the state. Returns whether anything is to be written (always: the report is counted).

    Fewer than ``strikes`` 429s within ``window_us``: sporadic, counted only (the request waits its Retry-After and
    is retried; nobody else slows down). Then: the rate halves (at most once per second) and a new epoch starts after
    Retry-After or the grace; later reports asking for no later resume are absorbed into that one.
    """
    if at_us - state.strike_at > window_us:
        state.strikes, state.strike_at = 0, at_us
    state.strikes += 1
    state.throttled += 1
    if state.strikes < strikes:
        return True
    halve = at_us - state.changed_at >= US or state.rate >= state.target
    resume_at = at_us + max(grace_us, int((retry_after_s or 0) * US))
    if not halve and resume_at <= state.anchor + US:
        return True
    if halve:
        state.rate = max(state.floor, state.effective_rate(at_us) / 2)
        state.changed_at = at_us
        state.decreases += 1
    state.strikes, state.strike_at = 0, at_us
    state.restart(resume_at, at_us)
    return True


class LimiterBackend(Protocol):
    """What a rate-limiter block provides (DynamoDB, or SQLite for one machine)."""

    def lease_lanes(self, key: str, spec: LimitSpec, n: int, *, renew: Mapping[int, int] | None = None,
                    hold: Iterable[int] = (), want: int = 1, must: int = 1, owner: str = "",
                    share: bool = False, need: int | None = None) -> Grant | Wait:
        """One call: the leases ``plan_lanes`` plans from the backend's current state, booked for ``owner``."""

    def release_lanes(self, key: str, tails: list[tuple[Lease, int]]) -> int:
        """Give back each lease's unused tail (lease, slots) while it is still its lane's tail; the slots given."""

    def report_throttle(self, key: str, spec: LimitSpec, retry_after_s: float | None) -> LimitState: ...

    def read(self, key: str) -> LimitState | None: ...

    def signal(self, key: str) -> Signal | None: ...

    def set_rate(self, key: str, spec: LimitSpec, per_second: float) -> LimitState: ...

    def set_paused(self, key: str, spec: LimitSpec, paused: bool) -> LimitState: ...
