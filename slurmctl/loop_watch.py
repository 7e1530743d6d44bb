"""Who holds a worker's event loop: an async handler that blocks it (a blocking call, a long computation).

Every item in flight in a worker process runs on one event loop (``slurmctl.inflight``). An ``async def`` handler
that calls ``time.sleep``, ``requests``, boto3 or a sync database driver holds that loop for the whole call: no other
item starts or hears its answer meanwhile, so the worker runs one call at a time, and a declared rate limit's slots
pass unused. Nothing fails and nothing is lost; the job is just slow, and its late slots would otherwise read as a
worker too busy for its limit (``slurmctl.pace_advice``), with the wrong advice (more worker processes).

So a watcher thread looks at the loop thread every ``LOOK_S``. A coroutine waiting for its answer is on no stack;
only a running one is. So when the loop thread's stack holds a frame of the handler's source file, the handler is
running, and it holds the loop when either:

* **it waits**: the thread waits in a call (a sleep, a socket read) just before and just after the look at its stack
  (``_in_a_call``): not running, not ready to run, not waiting for the GIL on a futex, and not back in the loop's
  own wait (epoll). A thread kept off a CPU by a busy machine is ready to run; the GIL's holder, another thread, may
  sit preempted for tens of ms on a busy machine: that holds the loop, but not through the handler. A handler
  blocking on a lock or a ``Future`` waits on a futex too, and is not counted. One look, not two a little apart:
  a handler that blocks 4 ms at a time is seen in its waits whatever the machine's load, so the time counted
  estimates the time it waited, where a second look had to find it waiting again and a busy machine, keeping the
  thread ready to run between its waits, hid most of them; or
* **it computes**: one step, seen at looks ``HELD_S`` apart or more with the loop never round between them; its
  time since the first of those looks counts once the loop thread has computed ``COMPUTED_S`` of it (a short step
  that a busy machine keeps off a CPU is not the handler's doing), but for spans where the loop thread was on a CPU
  less than ``OFF_CPU`` of the time (a step left waiting for the GIL). The loop's rounds are counted at its
  selector (``RoundCounter``: the loop selects once a round, and a task takes at most one step a round), so a
  coroutine's next step, a round later, is never taken for the same step. (A beat, a callback every 50 ms, judged
  the rounds before: when a round takes longer than the beat's period, the beat runs every other round only, so a
  loop of 400 items computing 0.2 ms each between yields sometimes met the same item at two looks, a round apart,
  with no beat between: counted as held, once in a CI run.)

A loop merely busy with many short steps (thousands of answers at once) is in another frame at each look, or went
round between, so it is not counted; nor are slurmctl's own stalls (a commit holding the GIL), with no handler frame
on the stack. Each look that finds the loop held counts the time since the last look (a step computing: since the
first look that saw it): an estimate, from samples, of the time held; and where (``places``: the handler's line,
and where it waited when that is deeper).

Costs nothing per item: 20 looks a second per worker process, and one count per round of the loop. Plain Python;
imports nothing of slurmctl.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import selectors
import sys
import threading
import time
from collections import Counter
from typing import Any


class Held:
    """What one job's handler did to a worker's event loop: the seconds it held it, the seconds its batches were on
    it, and where it held it (seconds per place)."""

    def __init__(self) -> None:
        self.held_s = 0.0
        self.watched_s = 0.0
        self.places: Counter[str] = Counter()

    def top_place(self) -> str | None:
        """Where it held the loop longest (``"handlers/geo.py, line 12, in handle"``), None if nowhere."""
        places = list(self.places.items())  # one step: the watcher may be adding a place
        return max(places, key=lambda p: p[1])[0] if places else None


class Entry:
    """A batch on the loop: its job's ``Held``, its handler's source files, its share of the time held."""

    def __init__(self, job: Held, files: frozenset[str]) -> None:
        self.job, self.files, self.held_s = job, files, 0.0


class RoundCounter(selectors.DefaultSelector):
    """An event loop's selector that counts the loop's rounds: a selector event loop selects once a round, then
    runs the callbacks ready (each task's next step among them). Give it to ``asyncio.SelectorEventLoop``."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.rounds += 1
        return super().select(timeout)


def new_event_loop() -> tuple[asyncio.AbstractEventLoop, RoundCounter]:
    """An event loop a ``LoopWatch`` can watch, and the counter of its rounds."""
    rounds = RoundCounter()
    return asyncio.SelectorEventLoop(rounds), rounds


class LoopWatch:
    """The watcher of one event loop (made by ``new_event_loop``), running in ``thread``: ``join`` a batch of async
    items to have the time the loop is held by its handler counted for it and its job (``held``), ``leave`` to read
    the batch's."""

    LOOK_S = 0.05  # how often the watcher looks
    HELD_S = 0.1  # one step seen running this long, the loop never round meanwhile: it holds the loop ...
    COMPUTED_S = 0.05  # ... having computed this long (the loop thread's CPU time), not only stretched by the machine
    OFF_CPU = 0.1  # ... and a span of it counts if its thread was on a CPU this share of it (not waiting for the GIL)

    def __init__(self, thread: threading.Thread, rounds: RoundCounter) -> None:
        self.thread, self.rounds = thread, rounds
        self.jobs: dict[str, Held] = {}  # per job, in this worker process
        self._cells: list[Entry] = []  # the joined batches
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cpu = _thread_cpu_clock(thread)  # None: no per-thread CPU clock here (then only computing is seen)
        self.watcher = threading.Thread(target=self._watch, name="slurmctl-loop-watch", daemon=True)
        self.watcher.start()

    def join(self, job_id: str, handler: Any) -> Entry:
        """A batch of ``handler``'s items goes on the loop: from now, time the handler holds it is counted, shared
        out equally between the batches of that handler on the loop at the time. Returns the batch's entry, for
        ``leave``."""
        entry = Entry(self.held(job_id), frozenset(source_files(handler)))
        with self._lock:
            self._cells.append(entry)
        return entry

    def leave(self, entry: Entry) -> float:
        """The batch's items are done: the seconds its handler held the loop while it ran (its share)."""
        with self._lock:
            self._cells.remove(entry)
        return entry.held_s

    def held(self, job_id: str) -> Held:
        """What the job's handler has done to this loop so far."""
        with self._lock:
            return self.jobs.setdefault(job_id, Held())

    def stop(self) -> None:
        self._stop.set()

    # --- the watcher's side ------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        last, cpu_last, rounds_last = time.monotonic(), self._cpu_s(), self.rounds.rounds
        step, step_seen, step_cpu, unheld = None, 0.0, 0.0, 0.0  # the step running at the last look (its frame),
        # when a look first saw it, the loop thread's CPU clock then, and the time it has computed since, not yet
        # counted (not yet known to hold the loop)
        while not self._stop.wait(self.LOOK_S):
            with self._lock:
                files = frozenset().union(*(e.files for e in self._cells))  # the handlers on the loop now
            waiting = bool(files) and self._in_a_call()  # read before the stack (reading a file lets go of the GIL)
            # The clocks, the rounds and the stack together, with nothing between that lets go of the GIL: the loop
            # thread's CPU time and rounds since the last look are then those between the two frames seen. (Read
            # before the wait, a loop thread that ran 27 ms of that wait and was then left waiting for the GIL in one
            # step looked like a step computing for the whole span, on a busy machine.)
            now, cpu, rounds = time.monotonic(), self._cpu_s(), self.rounds.rounds
            found = self._handler_frame(files) if files else None
            span, last = now - last, now
            on_cpu, cpu_last = cpu - cpu_last, cpu
            went_round, rounds_last = rounds != rounds_last, rounds
            with self._lock:
                for job in {id(e.job): e.job for e in self._cells}.values():
                    job.watched_s += span
            if found is None:
                step = None
                continue
            frame, innermost = found
            place = describe(frame, innermost)  # now: the frame moves on if its call ends
            waiting = waiting and self._in_a_call()  # ... and after: in a call all along, in the handler's code
            if frame is not step or went_round:  # another step (a coroutine's next one comes a round later)
                step, step_seen, step_cpu, unheld = frame, now, cpu, 0.0
            elif not waiting and on_cpu >= self.OFF_CPU * span:  # the same step, computing since the last look
                unheld += span
            held = span if waiting else 0.0
            if now - step_seen >= self.HELD_S and cpu - step_cpu >= self.COMPUTED_S:  # it holds the loop: its
                # computing counts since a look first saw it
                held, unheld = held + unheld, 0.0
            if held:
                self._count(held, frame.f_code.co_filename, place)

    def _in_a_call(self) -> bool:
        """Does the loop thread wait in a call (a sleep, a socket read, a blocking ``poll``)? Linux's ``/proc``
        names the kernel function a sleeping thread waits in (``wchan``), in one read: ``0`` while it runs or is
        ready to run (only kept off a CPU by others: a busy machine), a futex while it waits for the GIL (held by
        another thread) or a lock, epoll while the loop waits for its next event. Elsewhere: not known, so no."""
        try:
            with open(f"/proc/self/task/{self.thread.native_id}/wchan", "rb") as f:
                wchan = f.read().strip()
        except OSError:
            return False
        return wchan not in (b"", b"0") and not any(mark in wchan for mark in (b"futex", b"epoll", b"ep_poll"))

    def _handler_frame(self, files: frozenset[str]) -> tuple[Any, Any] | None:
        """The innermost frame of one of the handlers' ``files`` on the loop thread's stack, and the innermost
        frame."""
        innermost = frame = sys._current_frames().get(self.thread.ident or -1)
        while frame is not None:
            if frame.f_code.co_filename in files:
                return frame, innermost
            frame = frame.f_back
        return None

    def _count(self, seconds: float, file: str, place: str) -> None:
        with self._lock:
            holding = [e for e in self._cells if file in e.files]  # the batches of the handler found
            share = seconds / max(len(holding), 1)
            for e in holding:
                e.held_s += share
                e.job.held_s += share
                e.job.places[place] += share

    def _cpu_s(self) -> float:
        """The loop thread's CPU time; without a per-thread clock, as if it were always on a CPU. Once the thread has
        ended (its loop stopped: the worker stops), its clock is gone, and so is anything to watch."""
        if self._cpu is not None:
            try:
                return time.clock_gettime(self._cpu)
            except OSError:  # EINVAL: the thread ended (its loop stopped) since the last look
                self._stop.set()
        return time.monotonic()


def _thread_cpu_clock(thread: threading.Thread) -> int | None:
    try:
        return time.pthread_getcpuclockid(thread.ident or 0)
    except (AttributeError, OSError, TypeError):  # not a POSIX platform with per-thread CPU clocks
        return None


def source_files(handler: Any) -> list[str]:
    """The source files whose frames are the handler's own: its function's (or its class's ``__call__``'s), and the
    module's it is defined in."""
    if inspect.isfunction(handler) or inspect.ismethod(handler):
        call, owner = handler, handler
    else:
        call, owner = getattr(type(handler), "__call__", None), type(handler)
    files = set()
    code = getattr(inspect.unwrap(getattr(call, "__func__", call)), "__code__", None) if call is not None else None
    if code is not None:
        files.add(code.co_filename)
    path = getattr(sys.modules.get(getattr(owner, "__module__", None) or ""), "__file__", None)
    if path:
        files.add(path)
    return sorted(files)


def describe(frame: Any, innermost: Any) -> str:
    """``handlers/geo.py, line 12, in handle``, and where it waited when that is deeper (a library's socket call)."""
    said = _where(frame)
    return said if innermost is frame else f"{said} (waiting in {_where(innermost)})"


def _where(frame: Any) -> str:
    return f"{_short(frame.f_code.co_filename)}, line {frame.f_lineno}, in {frame.f_code.co_name}"


def _short(path: str) -> str:
    """A path as a user reads it: from the current directory, or from site-packages, when it is under them."""
    for mark in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if mark in path:
            return path.split(mark, 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
