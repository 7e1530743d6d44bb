"""A coordinator told to stop by a signal stops cleanly: Slurm's clock, preemption, ``scancel`` and Ctrl-C.

Admins and Slurm stop processes with SIGTERM first (walltime, ``scancel``, preemption with ``GraceTime``, a login
node's session limits), then SIGKILL; a terminal sends SIGINT (Ctrl-C) or SIGHUP (the session closed). Left to
Prefect, SIGTERM raises ``TerminationSignal`` wherever the coordinator is and kills it: the job said ``failed`` and
waited for someone to type ``resume``. So while the job flow runs, these three signals are ours:

1. The first one is a **stop request** (``requested()``): no further shard is submitted, the workers start no further
   batch, the batches running get ``stop_grace_s()`` (``SLURMCTL_STOP_GRACE_S``, default 15 s) to commit; then the
   phase ends *Cancelled*, its task runner closes the Dask cluster (dask-jobqueue cancels its Slurm jobs, and they are
   cancelled once more by name), the job manifest says ``stopped`` with the ``slurmctl resume`` that continues it,
   and the flow run ends *Cancelled* with the reason. Batches commit whole or not at all, so nothing is lost and
   nothing runs twice: a batch cut off by the grace never committed and runs again at resume.
   In the coordinator process the stop is bounded: ``CLOSE_S`` after the grace, a flow that has not ended (an
   unreachable Prefect API holds it in the client's retries) records the stop and exits as on a second signal.
2. A second one exits at once (``os._exit``), after at most ``HARD_EXIT_S`` for the books (the manifest's
   ``stopped``, once its local workers are killed or its Slurm jobs cancelled by name: ``flows/cancel.py``); in a
   notebook (not the coordinator process) a second Ctrl-C raises ``KeyboardInterrupt`` instead of ending the kernel.
   The commits are consistent either way.

A SIGTERM that a deployment's runner sends to cancel the run (a Cancel in the Prefect UI: the runner announces its
intent first) is Prefect's: it goes to Prefect's own handler, which ends the run Cancelled (``flows/cancel.py``).

Prefect puts its SIGTERM handler back at the start of each subflow, so each phase's body installs ours again
(``on_signals``, through ``flows.cancel.cancellable``); only the instants between a subflow's start and its body
are Prefect's, and a SIGTERM there still reaches us (Prefect passes it on to the handler it replaced) before its
``TerminationSignal``, which the job flow then reads as the stop it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

STOP_GRACE_S = 15.0  # the batches running when a stop signal came get this long to commit (SLURMCTL_STOP_GRACE_S)
HARD_EXIT_S = 3.0  # a second signal: at most this long for the books before the process exits
# After the grace, a coordinator process gets this long to close its cluster, write its books and end its Prefect
# run; then it records the stop and exits as on a second signal (an unreachable Prefect API would hold it for minutes
# in the client's retries). Grace + this = 27 s by default: within the 30 s Slurm's default KillWait leaves.
CLOSE_S = 12.0
SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def stop_grace_s() -> float:
    """``SLURMCTL_STOP_GRACE_S`` (seconds, >= 0), else ``STOP_GRACE_S``. Keep grace plus ~10 s (closing the cluster,
    the manifests, Prefect's last logs) inside what the site leaves between SIGTERM and SIGKILL (Slurm's
    ``KillWait``, 30 s by default; ``--signal=B:TERM@120`` gives a coordinator job two minutes)."""
    try:
        return max(0.0, float(os.environ.get("SLURMCTL_STOP_GRACE_S", STOP_GRACE_S)))
    except ValueError:
        return STOP_GRACE_S


@dataclass
class StopRequest:
    signal: str  # its name: SIGTERM, SIGINT, SIGHUP
    deadline: float  # time.monotonic() by which the batches running should have committed
    how: str = "on a second signal"  # how the process ended, when it did not wait for its stop to finish

    @property
    def reason(self) -> str:
        return f"stopped by {self.signal}"


_request: StopRequest | None = None
_count = 0
_held: list[str] = []  # signals that came before the first ``on_signals`` scope (``hold``)
_overdue: threading.Timer | None = None  # the coordinator's bound on its stop (``CLOSE_S``); ``disarm`` ends it
_listeners: list[Callable[[StopRequest], None]] = []  # told of the first signal (flows.cancel.CancelWatch)
_last_words: list[Callable[[StopRequest], None]] = []  # run (bounded) before a second signal's exit
_previous: dict[int, Any] = {}  # the handlers ours replaced (Prefect's SIGTERM bridge among them)
_depth = 0  # nested on_signals scopes (the coordinator, the job flow, each phase)
exit_on_second = False  # the coordinator process sets it: a second signal ends the process


def requested() -> StopRequest | None:
    """The stop request of this process, if a signal asked for one."""
    return _request


def listen(on_stop: Callable[[StopRequest], None], last_words: Callable[[StopRequest], None]) -> Callable[[], None]:
    """Call ``on_stop`` at the first signal (at once if one came already: the flow's start) and ``last_words`` before
    a second one's exit; returns the undo."""
    _listeners.append(on_stop)
    _last_words.append(last_words)
    if _request is not None:
        on_stop(_request)

    def undo() -> None:
        with contextlib.suppress(ValueError):
            _listeners.remove(on_stop)
        with contextlib.suppress(ValueError):
            _last_words.remove(last_words)
    return undo


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """Make SIGTERM, SIGINT and SIGHUP stop requests for the duration (main thread only: elsewhere Python cannot
    set handlers, and this does nothing). Restores the handlers it replaced. The outermost scope starts with no stop
    requested (a notebook's next job starts afresh); the request stays readable after it ends (the exit message)."""
    global _request, _count, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved: dict[int, Any] = {}
    outer = dict(_previous)
    if _depth == 0:
        _request, _count = None, 0
        if _held:  # a signal while the coordinator was starting: the job stops as soon as it has started
            _request, _count = StopRequest(_held[0], time.monotonic() + stop_grace_s()), 1
            _held.clear()
    _depth += 1
    for name in SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            saved[signum] = signal.signal(signum, _on_signal)
        except (ValueError, OSError):
            continue
    _previous.update(saved)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, handler)
        _previous.clear()
        _previous.update(outer)
        _depth -= 1


def hold() -> None:
    """The coordinator's first act, before its imports (~3 s of Prefect, Dask, pyarrow), its checks and the start of
    the Prefect server: a SIGTERM, SIGINT or SIGHUP meanwhile is kept instead of killing the process (Slurm may
    signal a coordinator job at any instant; a killed one would leave no ``stopped`` behind and queue no
    successor). The first ``on_signals`` scope takes it as the stop request, so the job stops as soon as its flow
    has started, with its books and its Prefect run in order. A second one exits at once."""
    _handle_all(_held_signal)


def _handle_all(handler: Any) -> None:
    """``handler`` for each of ``SIGNALS`` this platform has (signals are set in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, handler)


def release_held() -> bool:
    """A spare coordinator (``slurmctl.control.spare``) going idle: a signal ends it again (``SystemExit``, so it
    cleans up what lists it; it holds no job); ``hold`` is called again once a job comes. Returns whether one came
    while it imported."""
    came = bool(_held)
    _handle_all(_exit_idle)
    return came


def _exit_idle(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _held_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    _held.append(name)
    if len(_held) == 1:
        _say(f"slurmctl: {name} while starting: the job stops as soon as its flow has started; a second signal "
             f"exits at once")
        return
    _say(f"slurmctl: {name} again while starting: exiting now (nothing was started; `slurmctl resume` continues "
         f"the job)")
    os._exit(128 + signum)


def _runner_intent() -> Any:
    """The intent a Prefect runner announced before its SIGTERM (``cancel``), if any."""
    try:
        from prefect._internal.control_listener import get_intent

        return get_intent()
    except Exception:  # pinned Prefect has it; without it every SIGTERM is a stop request
        return None


def _on_signal(signum: int, frame: Any) -> None:
    global _request, _count
    previous = _previous.get(signum)
    prefects = callable(previous) and previous is not _on_signal
    if signum == signal.SIGTERM and prefects and _runner_intent() is not None:
        previous(signum, frame)  # a deployment's runner cancelling the run: Prefect's way (flows/cancel.py)
        return
    name = signal.Signals(signum).name
    _count += 1
    if _count == 1:
        _request = StopRequest(name, time.monotonic() + stop_grace_s())
        _say(f"slurmctl: {name}: stopping: no new batch starts, the running ones get {stop_grace_s():g} s to commit; "
             f"a second signal exits at once")
        for listener in list(_listeners):
            listener(_request)
        if exit_on_second:
            _arm(_request, signum)
        return
    request = _request or StopRequest(name, time.monotonic())
    _say(f"slurmctl: {name} again: exiting now (committed batches are kept; `slurmctl resume` continues the job)")
    _last(request)
    if exit_on_second:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"{name} twice")


def _last(request: StopRequest) -> None:
    """The listeners' last words (the job's ``stopped``, its Slurm jobs cancelled by name), at most ``HARD_EXIT_S``."""
    last = [threading.Thread(target=fn, args=(request,), daemon=True) for fn in list(_last_words)]
    for t in last:
        t.start()
    deadline = time.monotonic() + HARD_EXIT_S
    for t in last:
        t.join(max(0.0, deadline - time.monotonic()))


def _arm(request: StopRequest, signum: int) -> None:
    """The coordinator process's bound on a stop: if its flow has not ended ``CLOSE_S`` after the grace, the stop is
    recorded and the process exits as on a second signal."""
    global _overdue

    def overdue() -> None:
        bound = stop_grace_s() + CLOSE_S
        _say(f"slurmctl: still stopping {bound:g} s after {request.signal} (Prefect's API unreachable?): recording "
             f"the stop and exiting now (committed batches are kept; `slurmctl resume` continues the job)")
        _last(StopRequest(request.signal, request.deadline, f"{bound:g} s later, its stop unfinished"))
        os._exit(128 + signum)

    _overdue = threading.Timer(max(0.0, request.deadline - time.monotonic()) + CLOSE_S, overdue)
    _overdue.daemon = True
    _overdue.start()


def disarm() -> None:
    """The job flow has ended (its books written, its Prefect run ended): no bound on the rest of the exit."""
    global _overdue
    if _overdue is not None:
        _overdue.cancel()
        _overdue = None


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())
