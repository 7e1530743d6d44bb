"""Who holds a worker's event loop: an async handler that blocks it (a blocking call, a long computation).

Every item in flight in a worker process runs on one event loop (``slurmctl.inflight``). An ``async def`` handler
that calls ``time.sleep``, ``requests``, boto3 or a sync database driver holds that loop for the whole call: no other
item starts or hears its answer meanwhile, so the worker runs one call at a time, and a declared rate limit's slots
pass unused. Nothing fails and nothing is lost; the job is just slow, and its late slots would otherwise read as a
worker too busy for its limit (``slurmctl.pace_advice``), with the wrong advice (more worker processes).

So a watcher thread looks at the loop thread every ``BEAT_S``. A coroutine waiting for its answer is on no stack;
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
* **it computes**: the same frame as at the last look, the loop's beat (a callback every ``BEAT_S``) ``HELD_S``
  late and not run since that look, and the loop thread on a CPU for ``OFF_CPU`` of the time since: one step
  computing for that long (not a coroutine's next step after the loop went round, nor a step left waiting for the
  GIL all along).

A loop merely busy with many short steps (thousands of answers at once) is on a CPU and in another frame at each
look, so it is not counted; nor are slurmctl's own stalls (a commit holding the GIL), with no handler frame on the
stack. Each look that finds the loop held counts the time since the last look: an estimate, from samples, of the
time held; and where (``places``: the handler's line, and where it waited when that is deeper).

Costs nothing per item: 20 looks and 20 beats a second per worker process. Plain Python; imports nothing of slurmctl.
"""

from __future__ import annotations

import asyncio
import inspect
import os
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


class LoopWatch:
    """The watcher of one event loop, running in ``thread``: ``join`` a batch of async items to have the time the
    loop is held by its handler counted for it and its job (``held``), ``leave`` to read the batch's."""

    BEAT_S = 0.05  # the loop's beat, and how often the watcher looks
    HELD_S = 0.1  # a beat this late: the loop is held (a busy loop at 2,000 calls/s runs its beat within ~20 ms)
    OFF_CPU = 0.1  # a step on a CPU this share of the time since the last look, and the beat late: it computes

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.loop, self.thread = loop, thread
        self.beat = time.monotonic()
        self.jobs: dict[str, Held] = {}  # per job, in this worker process
        self._cells: list[Entry] = []  # the joined batches
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cpu = _thread_cpu_clock(thread)  # None: no per-thread CPU clock here (then only computing is seen)
        loop.call_soon_threadsafe(self._tick)
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

    # --- the loop's side ---------------------------------------------------------------------------------------------
    def _tick(self) -> None:
        self.beat = time.monotonic()
        if not self._stop.is_set():
            self.loop.call_later(self.BEAT_S, self._tick)

    # --- the watcher's side ------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        last, seen, cpu_last, beat_last = time.monotonic(), None, self._cpu_s(), self.beat
        while not self._stop.wait(self.BEAT_S):
            with self._lock:
                files = frozenset().union(*(e.files for e in self._cells))  # the handlers on the loop now
            waiting = bool(files) and self._in_a_call()  # read before the stack (reading a file lets go of the GIL)
            # The clocks and the stack together, with nothing between that lets go of the GIL: the loop thread's CPU
            # time since the last look is then the time between the two frames seen. (Read before the wait, a loop
            # thread that ran 27 ms of that wait and was then left waiting for the GIL in one step looked like a
            # step computing for the whole span, on a busy machine.)
            now, cpu, beat = time.monotonic(), self._cpu_s(), self.beat
            found = self._handler_frame(files) if files else None
            span, last = now - last, now
            on_cpu, cpu_last = cpu - cpu_last, cpu
            came_round, beat_last = beat != beat_last, beat  # the beat ran since the last look: the loop went round
            with self._lock:
                for job in {id(e.job): e.job for e in self._cells}.values():
                    job.watched_s += span
            if found is None:
                seen = None
                continue
            frame, innermost = found
            place = describe(frame, innermost)  # now: the frame moves on if its call ends
            waiting = waiting and self._in_a_call()  # ... and after: in a call all along, in the handler's code
            computing = (frame is seen and not came_round and now - beat >= self.HELD_S
                         and on_cpu >= self.OFF_CPU * span)
            if computing or waiting:
                self._count(span, frame.f_code.co_filename, place)
            seen = frame

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
