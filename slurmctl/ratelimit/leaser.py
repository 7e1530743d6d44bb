"""The worker side of a rate limit: one process's spender, holding leases on several lanes (``lanes`` has the maths).

It hands out slots in time order to the process's threads, measures their pace to decide how many lanes to hold,
renews all its lanes in one backend call, follows pause/rate/throttle epochs through the limit's signal, and reports
what it cost and how late it handed tokens out.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, MutableMapping

from slurmctl.ratelimit.lanes import US, Grant, Lease, LimiterBackend, LimitSpec, Wait, now_us
from slurmctl.ratelimit.outages import OutageLog

TRACE_ENV = "SLURMCTL_LIMIT_TRACE"  # a directory: every token's slot, hand-out time and lane, one file per process

log = logging.getLogger("slurmctl.ratelimit")


@dataclass
class _Held:
    """A lease this process is spending."""

    lease: Lease
    used: int = 0
    renewed: bool = False

    @property
    def left(self) -> int:
        return self.lease.count - self.used


@dataclass
class _Pace:
    """One calling thread's pace: how long it works between tokens (a moving average)."""

    returned_at: float | None = None  # time.monotonic() when it last got a token
    work_s: float | None = None
    seen_at: float = field(default_factory=time.monotonic)


class _Trace:
    """Every token's slot, hand-out time and lane, appended to ``$SLURMCTL_LIMIT_TRACE/<key>.<pid>.txt`` when that
    variable names a directory: to check a job's grants, or to see the jitter, after the fact. Slots that passed
    unused are there too, lane ``-1`` (reserved, but its caller came later than the allowance) or ``-2`` (nobody
    was waiting for it; the time is when that was seen): which of the two a job loses tells a late worker from
    one short of demand."""

    LATE, UNWANTED = -1, -2

    def __init__(self, key: str):
        self.file = None
        folder = os.environ.get(TRACE_ENV)
        if folder:
            os.makedirs(folder, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
            self.file = open(os.path.join(folder, f"{name}.{os.getpid()}.txt"), "a", buffering=1)

    def note(self, slot_us: int, handed_us: int, lane: int) -> None:
        if self.file is not None:
            self.file.write(f"{slot_us} {handed_us} {lane}\n")


class Leaser:
    """One process's spender for one limit: holds leases on several lanes and hands out their slots in time order.

    Thread-safe. ``acquire(n)`` blocks until ``n`` slots are due and returns the seconds it waited. How many lanes it
    holds follows how fast its callers are: each calling thread's time between tokens is measured, and the process
    holds as many lanes as its threads could spend without falling behind (their summed pace within 80 % of the
    slots' spacing). All its lanes are renewed in one backend call.

    Sharing: every lease books its lanes under this leaser's ``owner`` tag, and the backend's answer says how many
    processes hold lanes (of any job on the key) and our fair share (``lanes.fair_share``). A process holding fewer
    than its fair share of what it can spend queues behind the lanes of those holding more, in its renewal call (no
    extra calls), and they cannot renew a lane once someone booked behind it. Lanes nobody else asks for stay with
    whoever spends them.
    """

    PREFETCH = 2  # renew leases when this many slots are left, so the lanes continue without a gap
    SIGNAL_RETRY_S = 0.2  # a failed signal read is tried again this soon (then doubling, up to signal_s)
    PAUSE_RECHECK_S = 10.0  # while the signal says paused, ask the backend this often whether the pause holds
    PROBE_S = (1.0, 4.0)  # below our fair share, looking for more lanes: after this, doubling (a lease of one lane
    # lasts up to 25 s: waiting for the renewal left a process at half its share that long)
    TOKENS_PER_CALL = 32  # a lease is sized to last this many of our tokens
    SETTLE_S = 2.0  # a worker of a job takes no more than its fair share of lanes this long after it first asked
    KEEP_S = 2.0  # lanes wanted are given up only once fewer were wanted for this long (a caller idle for a moment)
    SPARE_PACE = 4.0  # lanes nobody else wants are held up to this many times our callers' pace (``spare_lanes``)

    def __init__(self, backend: LimiterBackend, key: str, spec: LimitSpec,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], int] = now_us):
        self.backend, self.key, self.spec = backend, key, spec
        self.sleep, self.clock = sleep, clock
        self.lock = threading.Lock()
        self.held: list[_Held] = []
        self.epoch = -1
        self.next_signal_us = 0
        self.pace: dict[int, _Pace] = {}
        self.lane_interval_us = int(spec.lane_s * US)
        self.free_last = spec.lane_count  # lanes free in the backend's last answer: looking for more is worth a call
        self.late_us = int(spec.late_allowance_s * US)  # a slot may be handed out this late, no later
        self.probe_at_us, self.probe_step_s = 0, self.PROBE_S[0]
        self.kept_want, self.kept_at_us = 0, 0  # the most lanes wanted lately, and since when
        self.owner = secrets.token_hex(3)  # our tag on the lanes we book: the backend counts holders by it
        self.holders = 0  # processes holding lanes, by the backend's last answer (0: no answer yet)
        self.share = 0  # our fair share of the lanes, by the backend's last answer (0: no answer yet)
        self.granted = 0
        self.expired = 0
        self._claims = threading.Lock()  # claims by async callers: never behind a backend call
        self.claim_expired = 0  # reserved slots their async callers reached too late
        self.claim_waited_s = 0.0
        self.waited_s = 0.0
        self.backend_calls = 0
        self.signal_calls = 0
        self.paused_s = 0.0
        self.late_us_max = 0  # the latest a token was handed out after its slot (the jitter this side adds)
        self.asked_backend_us = 0  # when we last asked the backend for a lease (it is the truth; the signal a hint)
        self.started_us = clock()
        self.trace = _Trace(key)
        seconds = lambda: self.clock() / US  # noqa: E731
        self.signal_log = OutageLog(log, f"reading the signal of rate limit {key!r}", clock=seconds)
        self.report_log = OutageLog(log, f"reporting throttling of rate limit {key!r}", clock=seconds)

    @property
    def signal_errors(self) -> int:
        return self.signal_log.failures

    @property
    def throttle_report_errors(self) -> int:
        return self.report_log.failures

    # --- how many lanes this process can spend -------------------------------------------------------------------
    def capacity(self) -> float | None:
        """Tokens/s this process's threads could spend if slots never made them wait (None: not measured yet)."""
        now, total = time.monotonic(), 0.0
        for ident, pace in list(self.pace.items()):
            if now - pace.seen_at > max(10.0, 4 * (pace.work_s or 0.0)):
                del self.pace[ident]  # a thread that stopped asking (its batch ended)
                continue
            if pace.work_s is None:
                return None
            total += 1 / max(pace.work_s, 1e-4)
        return total or None

    def fair_lanes(self) -> int:
        """Our fair share of the lanes among the processes holding some (the backend's last answer), or, before
        any answer, among the job's worker processes (``LimitSpec.workers``, a hint)."""
        return self.share or self.spec.fair_lanes

    def offer_per_s(self) -> float:
        """Tokens/s our fair share of the lanes carries: what this process's callers can count on (the concurrency
        they need is this times their calls' latency)."""
        return self.fair_lanes() * US / self.lane_interval_us

    def even_offer_per_s(self) -> float:
        """Tokens/s an equal share of the lanes among the processes holding some carries: what each one can count on
        when every one of them wants more than it holds (a job whose workers are all held back by its concurrency
        setting). ``offer_per_s`` is more whenever the others hold less than an equal share, as they do while held
        back: each process is offered the lanes the others leave unused, and advice sized on it (2 processes, 50/s,
        1 s answers, 16 in flight each: 55 in flight where 25 spend each one's share) was twice what any of them
        needed. Before the backend's first answer: ``offer_per_s``."""
        if not self.holders:
            return self.offer_per_s()
        return min(self.offer_per_s(), self.spec.lane_count / self.holders * US / self.lane_interval_us)

    def wanted_lanes(self) -> int:
        """Lanes we want: as many as our callers can spend (before their pace is measured: one, or the job's share
        when ``LimitSpec.workers`` hints how many share the limit)."""
        capacity = self.capacity()
        if not capacity:
            return max(1, min(self.spec.lane_count, self.spec.fair_lanes))  # a first guess: not kept
        want = int(capacity * 0.8 * self.lane_interval_us / US)
        if self.spec.workers and self.spec.workers > 1 and self.clock() - self.started_us < self.SETTLE_S * US:
            want = min(want, self.spec.fair_lanes)  # the job's other workers are starting too: theirs to take
        want = max(1, min(self.spec.lane_count, want))
        # Give lanes up slowly: a caller pauses between batches, and an async process's one dispenser thread looks
        # idle whenever its items are between calls; dropping lanes then and taking them back a second later (when
        # others may hold them) lost a third of a 500/s limit. Lanes kept too long only pass unused for KEEP_S.
        now = self.clock()
        if want >= self.kept_want or now - self.kept_at_us >= self.KEEP_S * US:
            self.kept_want, self.kept_at_us = want, now
        return max(want, self.kept_want)

    def spare_lanes(self, need: int) -> int:
        """Lanes to hold beyond ``need`` while nobody else wants them (``lanes.plan_lanes`` takes only free ones and
        books them as spare: anyone queueing for a share books behind them first): enough for ``SPARE_PACE`` times
        our callers' pace, up to half our fair share. A caller ready between two of our slots waits for the next; on
        only the lanes its pace needs, one sync thread calling every 200 ms took 3.1 tokens/s of a 100/s limit where
        it could take 5. Only a process far below its share holds spare lanes: two processes of a 2,000/s job each
        a little below theirs queued behind each other's spare lanes, at four times the backend calls per token and
        4 % of their calls answered 429 (0.12 % without)."""
        capacity = self.capacity()
        if not capacity:
            return 0
        lanes = min(math.ceil(self.SPARE_PACE * capacity * self.lane_interval_us / US), self.fair_lanes() // 2)
        return max(0, lanes - need)

    def _asked_lanes(self) -> tuple[int, int]:
        """What to ask the backend for: the lanes our callers need (``wanted_lanes``), and those plus the spare ones
        (``spare_lanes``), taken only while free and held as spare (``lanes.plan_lanes``)."""
        need = self.wanted_lanes()
        return need, need + self.spare_lanes(need)

    def _note_work(self, pace: _Pace, queued: bool = False) -> None:
        pace.seen_at = time.monotonic()
        if pace.returned_at is not None:
            sample = 0.0 if queued else min(pace.seen_at - pace.returned_at, self.lane_interval_us / US)
            pace.work_s = sample if pace.work_s is None else 0.8 * pace.work_s + 0.2 * sample

    # --- leases ----------------------------------------------------------------------------------------------------
    def _lease_size(self, lanes: int) -> int:
        """Slots per lane for a lease of ``lanes`` lanes: enough for about ``TOKENS_PER_CALL`` tokens at the pace this
        process spends them (so the backend sees ~1 call per that many tokens), at most ``lease_size``. A process
        holding many lanes thus holds each briefly: lanes it stops spending come free within seconds.

        With more processes than lanes (the backend's last answer), lanes are time-shared and every hand-over costs
        the previous holder a refused renewal besides the newcomer's booking: two calls per lease, so leases are then
        twice as long (64 processes on 32 lanes of a 40/s limit on DynamoDB: 0.05-0.06 calls per token, 0.03 so)."""
        lane_rate = US / self.lane_interval_us
        spend = lanes * lane_rate
        capacity = self.capacity()
        if capacity:
            spend = min(spend, capacity)
        shared = 2 if self.holders > self.spec.lane_count else 1
        slots = math.ceil(shared * self.TOKENS_PER_CALL / (spend * self.lane_interval_us / US))
        return max(2 * self.PREFETCH, min(shared * self.spec.lease_size, slots))

    def _lease(self, *, want: int, need: int | None = None, **kw: Any) -> Grant | Wait:
        self.asked_backend_us = self.clock()
        # Sized for the lanes we will likely hold: those renewed or held, plus what the last answer showed free, up to
        # what we want. (Counting only live leases sized a renewal of 29 lanes as one of a single lane: 16 slots
        # each, 13 s during which nobody else could have them.)
        mine = len(kw.get("renew") or ()) + len(set(kw.get("hold") or ()))
        likely = min(want, max(1, mine + self.free_last))
        got = self.backend.lease_lanes(self.key, self.spec, self._lease_size(likely), want=want, owner=self.owner,
                                       share=True, need=need, **kw)
        self.backend_calls += got.calls
        if isinstance(got, Wait):
            self.free_last = 0
            return got
        self.holders, self.share = got.holders or self.holders, got.share or self.share
        if got.leases and got.leases[0].epoch > self.epoch:
            self.held = [h for h in self.held if h.lease.epoch >= got.leases[0].epoch]
            self.epoch = got.leases[0].epoch
        for lease in got.leases:
            self.held.append(_Held(lease))
            self.granted += lease.count
            self.lane_interval_us = lease.interval_us
        self.free_last = got.free
        return got

    def _live(self) -> list[_Held]:
        return [h for h in self.held if not h.renewed and h.lease.count > h.used]

    def _top_up(self) -> None:
        """Renew all our leases when one is about to run out (one call, which also takes more lanes if wanted and
        free, and queues for our fair share if we hold less); between renewals, take more lanes when the backend's
        last answer showed free ones, and now and then queue for our fair share if we hold less."""
        live = self._live()
        need, want = self._asked_lanes()
        if live and self._renewal_due():
            renew = live  # all of them: one call per lease span, however the lanes' phases drift apart
            for h in renew:
                h.renewed = True
            self._lease(renew={h.lease.lane: h.lease.end_us for h in renew}, want=want, need=need, must=0)
            return
        # Between renewals (which take free lanes too, at no extra cost): look for more when the last answer showed
        # free lanes; and, below our fair share, now and then even when it did not (someone's extra lanes come free
        # within their lease, and we queue behind them).
        now = self.clock()
        below_fair = len(live) < min(need, self.fair_lanes())
        if live and len(live) < want and (self.free_last > 0 or (below_fair and now >= self.probe_at_us)):
            got = self._lease(hold=[h.lease.lane for h in live], want=want, need=need, must=0)
            if isinstance(got, Grant) and got.leases:
                self.probe_step_s = self.PROBE_S[0]
            elif below_fair:
                self.probe_at_us = now + int(self.probe_step_s * US)
                self.probe_step_s = min(self.probe_step_s * 2, self.PROBE_S[1])

    def _check_signal(self) -> None:
        """At most every ``signal_s``: a new epoch voids our leases; a pause holds us here until resumed.

        The signal is a hint, the backend the truth: every lease carries its epoch, and the backend grants leases only
        in its current epoch and never while paused. So a worker that cannot read the signal keeps spending the leases
        it holds — it follows a change at its next lease at the latest, the same bound as for a limit shared with
        another job — and tries the signal again soon; the failure is logged once per outage and counted. A signal
        older than our epoch (a lease told us of a newer one) is stale and ignored, and while the signal says paused
        we ask the backend every ``PAUSE_RECHECK_S``: a resume whose signal could not be published holds no one.
        """
        while self.clock() >= self.next_signal_us:
            self.next_signal_us = self.clock() + int(self.spec.signal_s * US)
            self.signal_calls += 1
            try:
                sig = self.backend.signal(self.key)
            except Exception as exc:
                self.signal_log.failed(exc)
                retry_s = self.SIGNAL_RETRY_S * 2 ** min(self.signal_log.consecutive - 1, 16)
                self.next_signal_us = self.clock() + int(min(self.spec.signal_s, retry_s) * US)
                return
            self.signal_log.succeeded()
            if sig is None or sig.epoch < self.epoch:
                return  # nothing signalled yet, or older news than our last lease brought
            if sig.epoch > self.epoch:
                self.held, self.epoch = [], sig.epoch
                self.free_last, self.probe_step_s = self.spec.lane_count, self.PROBE_S[0]
            if not sig.paused:
                return
            if self.clock() - self.asked_backend_us >= int(self.PAUSE_RECHECK_S * US):
                return  # a lease asks the backend whether the pause still holds (and waits if it does)
            self.paused_s += self.spec.signal_s
            self.waited_s += self.spec.signal_s
            self.sleep(self.spec.signal_s)

    def _wait_until(self, slot_us: int, epoch: int) -> tuple[float, bool]:
        """Sleep until our slot without the lock, reading the signal on the way: a slot can lie a lease span ahead
        (seconds), and a pause, rate change or throttling signalled meanwhile voids it. Returns (seconds slept,
        whether the slot still stands); a voided slot is given up and the caller asks for a new one (after the pause,
        at the new rate)."""
        slept = 0.0
        while True:
            now = self.clock()
            if now >= slot_us:
                return slept, True
            step = min(slot_us, max(self.next_signal_us, now)) - now
            if step > 0:
                self.sleep(step / US)
                slept += step / US
            if self.clock() < slot_us and self.signal_due():
                with self.lock:
                    self._check_signal()
            if self.epoch != epoch:
                return slept, False

    def _next_slot(self) -> tuple[int, int]:
        """The time and lane of this process's next slot, leasing more when needed."""
        while True:
            self._check_signal()
            self._top_up()
            best = self._earliest(self.clock())
            self.held = [h for h in self.held if h.left > 0 or not h.renewed]
            if best is not None:
                best[1].used += 1
                return best[0], best[1].lease.lane
            self.held = [h for h in self.held if h.left > 0]
            need, want = self._asked_lanes()
            got = self._lease(hold=(), want=want, need=need, must=1)
            if isinstance(got, Wait):
                # Spread the retries of workers that were all told to wait: no thundering herd on the backend.
                pause = got.seconds + random.uniform(0, self.spec.signal_s)
                if got.paused:
                    self.paused_s += pause
                    self.next_signal_us = 0
                self.waited_s += pause
                self.sleep(pause)

    def acquire(self, tokens: int = 1, tally: MutableMapping[str, float] | None = None) -> float:
        """Block until ``tokens`` slots are due; return the seconds waited for them. ``tally`` (e.g. a batch's
        metrics) gets what this call cost besides: backend calls, expired slots, time paused, signal errors, and
        ``late_ms_max``, how late after its slot a token was handed out (jitter this side adds to the request).

        The lock is held to pick a slot, never while sleeping toward it: a process's threads wait for their slots
        side by side and each claims its own when due, as async callers do. (Sleeping with the lock held made them
        take turns, one slot per wake-up and GIL hand-off; at 500/s the late ones expired and sync handlers with
        ``concurrency: auto`` reached 0.2-0.45 of the rate.)"""
        caller, waited, got = threading.get_ident(), 0.0, 0
        while got < tokens:
            slot, lane, epoch = self.reserve_wait(caller, tally)
            slept, valid = self._wait_until(slot, epoch)
            waited += slept
            if valid and self.claim(slot, lane, epoch, slept, tally):
                got += 1
                # A thread's pace is the work it does between tokens, not its wait for a slot: time it from here.
                pace = self.pace.get(caller)
                if pace is not None:
                    pace.returned_at = time.monotonic()
            else:
                self.unclaimed(caller)
        return waited

    def unclaimed(self, caller: Any) -> None:
        """The caller's slot passed unclaimed (it woke too late, or a new epoch voided it): its next reservation
        replaces this one and is no new demand, so it gives no pace sample. (Timed as one, the few ms between the two
        reservations read as a caller spending 200 tokens/s: a thread doing 150 ms of work per token, woken late once
        on a loaded machine, wanted every lane for the next 2 s.)"""
        pace = self.pace.get(caller)
        if pace is not None:
            pace.returned_at = None

    # --- the event loop's path: reserve a slot, wait for it on the loop, then claim it --------------------------------
    # Why: one thread handing out tokens to an event loop hands them late. It wakes at its slot and waits for the GIL
    # the loop's thread holds while it parses answers (up to the 5 ms switch interval), and then the loop must notice
    # the token before the request is sent. At 500/s and burst 5 the allowance is 4 ms: a third of the slots passed
    # unused. An async caller instead sleeps on the loop until its slot and claims it there, right before its
    # request, so the lateness checked is the lateness the API sees. The loop never waits for the lock: a thread
    # holding it may be in a backend call (or asleep through a pause).
    def reserve(self, ahead_s: float, caller: Any, tally: MutableMapping[str, float] | None = None,
                ) -> tuple[int, int, int] | None:
        """A slot reserved without blocking: (slot µs, lane, epoch); None when that needs the backend (a renewal or
        the signal is due), the lock is busy, or the slot lies more than ``ahead_s`` ahead: then ``reserve_wait`` in
        a thread."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            # The event loop's path, once per token: each step is written to be cheap (64 lanes held at 2000/s).
            now = self.clock()
            if now >= self.next_signal_us:
                return None
            live = self._live()
            if self._renewal_due(live):
                return None
            expired = self.expired  # the one counter this can change
            best = self._earliest(now)
            if tally is not None and self.expired != expired:
                tally["expired"] = round(tally.get("expired", 0) + self.expired - expired, 3)
            if best is None or best[0] - now > ahead_s * US:
                return None
            best[1].used += 1
            return best[0], best[1].lease.lane, self._reserved_mark(best[0], now, caller, len(live))
        finally:
            self.lock.release()

    def reserve_wait(self, caller: Any, tally: MutableMapping[str, float] | None = None) -> tuple[int, int, int]:
        """``reserve`` for when the backend is needed: renews, reads the signal, waits out a pause or a full limit,
        and returns the next slot without waiting for it (blocking: run it in a thread)."""
        with self.lock:
            before = self._counters()
            try:
                slot, lane = self._next_slot()
                return slot, lane, self._reserved_mark(slot, self.clock(), caller)
            finally:
                self._tally(before, tally)

    def signal_due(self) -> bool:
        return self.clock() >= self.next_signal_us

    def check_signal(self) -> None:
        """Read the signal if it is due (blocking: a thread's job; a pause holds the caller here)."""
        with self.lock:
            self._check_signal()

    def claim(self, slot_us: int, lane: int, epoch: int, waited_s: float,
              tally: MutableMapping[str, float] | None = None) -> bool:
        """The reserved slot is due: True if it still stands (same epoch, not later than the allowance), else it
        passed (counted as expired) and the caller reserves another. Never waits for the leaser's lock."""
        handed = self.clock()
        late = handed - slot_us
        with self._claims:
            self.claim_waited_s += waited_s
            if epoch != self.epoch:
                return False
            if late > self.late_us:
                self.trace.note(slot_us, handed, _Trace.LATE)
                self.claim_expired += 1
                if tally is not None:  # expired: every slot passed unused; late: those whose caller came too late
                    tally["expired"] = tally.get("expired", 0) + 1
                    tally["late"] = tally.get("late", 0) + 1
                return False
            self.late_us_max = max(self.late_us_max, late)
            self.trace.note(slot_us, handed, lane)
        if tally is not None:
            tally["late_ms_max"] = max(tally.get("late_ms_max", 0), round(max(0, late) / 1000, 1))
        return True

    def _earliest(self, now: int) -> tuple[int, _Held] | None:
        """Our earliest slot not handed out yet (slots already too late are skipped and counted as expired)."""
        late_ok = now - self.late_us
        best: tuple[int, _Held] | None = None
        for h in self.held:
            lease, used = h.lease, h.used
            count, start, interval = lease.count, lease.start_us, lease.interval_us
            if used >= count:
                continue
            slot = start + used * interval
            if slot < late_ok:
                # Slots earlier than `late_ok` have passed unused: skip them, keep the rest of the lease.
                skipped = min(-(-(late_ok - start) // interval), count) - used
                self.expired += skipped
                if self.trace.file is not None:
                    for k in range(used, used + skipped):
                        self.trace.note(start + k * interval, now, _Trace.UNWANTED)
                used = h.used = used + skipped
                if used >= count:
                    continue
                slot = start + used * interval
            if best is None or slot < best[0]:
                best = (slot, h)
        return best

    def _reserved_mark(self, slot: int, now: int, caller: Any, live: int | None = None) -> int:
        """Note the async callers' pace (their demand) and return the epoch the slot belongs to. The loop's callers
        are many: its pace is the time between reservations, except that a slot more than one of our slot spacings
        ahead means callers queue for tokens, so they could spend more lanes than we hold."""
        pace = self.pace.setdefault(caller, _Pace())
        spacing = self.lane_interval_us / max(1, len(self._live()) if live is None else live)
        self._note_work(pace, queued=slot - now > spacing)
        pace.returned_at = time.monotonic()
        return self.epoch

    def _renewal_due(self, live: list[_Held] | None = None) -> bool:
        """No live lease, or one about to run out (``PREFETCH`` slots left, or half of a shorter lease)."""
        live = self._live() if live is None else live
        if not live:
            return True
        prefetch = self.PREFETCH
        for h in live:
            count = h.lease.count
            if count - h.used <= (prefetch if count >= 2 * prefetch else count // 2):
                return True
        return False

    def throttled(self, retry_after_s: float | None, tally: MutableMapping[str, float] | None = None) -> None:
        """The API said 429. The backend counts it; several close together are a quota change (a new epoch, which
        voids our leases too). A sporadic one changes nothing here: the request waits its Retry-After."""
        with self.lock:
            before = self._counters()
            self.backend_calls += 1
            try:
                state = self.backend.report_throttle(self.key, self.spec, retry_after_s)
            except Exception as exc:
                # Never hide the API's error behind the limiter's (the caller re-raises the API's): count and log
                # this one, and stop spending our leases; other workers report their 429s, and our next lease
                # follows whatever the backend says.
                self.report_log.failed(exc)
                self.held = []
            else:
                self.report_log.succeeded()
                if state.epoch > self.epoch:
                    self.held, self.epoch = [], state.epoch
            self._tally(before, tally)

    def _counters(self) -> dict[str, float]:
        return {"backend_calls": self.backend_calls, "expired": self.expired + self.claim_expired,
                "paused_s": self.paused_s,
                "signal_errors": self.signal_errors, "throttle_report_errors": self.throttle_report_errors}

    def _tally(self, before: dict[str, float], tally: MutableMapping[str, float] | None) -> None:
        """Add what changed since ``before`` (all of it by this call: we hold the lock) to ``tally``."""
        if tally is None:
            return
        for name, value in self._counters().items():
            if value != before[name]:
                tally[name] = round(tally.get(name, 0) + value - before[name], 3)

    def close(self) -> None:
        """Give back the unused tails of our leases (one call), so the next worker need not wait for them to pass."""
        with self.lock:
            now = self.clock()
            tails: list[tuple[Lease, int]] = []
            for h in self.held:
                future = min(h.left, max(0, -(-(h.lease.end_us - now) // h.lease.interval_us)))
                if future > 0 and future == h.left:  # the lease's unused tail, nothing skipped before it
                    tails.append((h.lease, future))
                elif h.left:
                    self.expired += h.left
            if tails:
                self.backend_calls += 1
                released = self.backend.release_lanes(self.key, tails)
                self.expired += sum(n for _, n in tails) - released  # booked after by someone: they just pass
            self.held = []

    def metrics(self, name: str) -> dict[str, float]:
        return {f"ratelimit_{name}_granted": self.granted,
                f"ratelimit_{name}_wait_s": round(self.waited_s + self.claim_waited_s, 3),
                f"ratelimit_{name}_backend_calls": self.backend_calls,
                f"ratelimit_{name}_expired": self.expired + self.claim_expired,
                f"ratelimit_{name}_paused_s": round(self.paused_s, 3),
                f"ratelimit_{name}_signal_errors": self.signal_errors,
                f"ratelimit_{name}_throttle_report_errors": self.throttle_report_errors,
                f"ratelimit_{name}_late_ms_max": round(self.late_us_max / 1000, 1)}
