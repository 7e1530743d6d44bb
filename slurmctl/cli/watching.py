"""``--wait``: follow a job from its manifest until it ends (a live bar on a terminal, a line every 10 s
otherwise), and the exit code for how it ended."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from slurmctl.cli.common import EXIT_DETACHED, EXIT_FAILED, EXIT_OK, _err
from slurmctl.config import StorageConfig
from slurmctl.control.slurm_coordinator import continued_on_slurm
from slurmctl.progress_display import TerminalProgress, progress_line

# How long `--wait` waits, once the job has ended, for its coordinator process to exit (normally 1-2 s).
COORDINATOR_EXIT_WAIT_S = 30


def watch(job_id: str, storage: StorageConfig, proc: subprocess.Popen | None, log: Path | None,
          announce: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Follow a job from its manifest until it ends; return the exit code for its final status. ``announce`` sees
    each status view (it prints the flow run's UI link once the coordinator has created the run)."""
    from slurmctl.books.manifests import TERMINAL_STATUSES
    from slurmctl.books.status import status_view
    from slurmctl.books.store import load_job, reader_for

    store = reader_for(storage)
    tty = sys.stderr.isatty()
    display = None
    if tty:  # a live rich bar; the plain lines below otherwise (logs, CI, pipes)

        display = TerminalProgress(job_id)
    last_print, view = 0.0, None
    try:
        with display or contextlib.nullcontext():
            while True:
                job = load_job(store, job_id)
                view = status_view(job.model_dump(mode="json"))
                if announce is not None:
                    announce(view)
                if view["status"] in TERMINAL_STATUSES and not continued_on_slurm(job):
                    break
                if proc is not None and proc.poll() is not None:
                    job = load_job(store, job_id)  # it may have finished between our two reads
                    view = status_view(job.model_dump(mode="json"))
                    if view["status"] not in TERMINAL_STATUSES:
                        if display is None:
                            print(file=sys.stderr)
                        else:
                            display.update(view)
                        code = "" if proc.returncode is None else f" (code {proc.returncode})"  # a spare's: unknown
                        _err(f"the coordinator exited{code} before the job finished; see {log}; "
                             f"`slurmctl resume {job_id}` continues it")
                        return EXIT_FAILED
                    break
                if display is not None:
                    display.update(view)
                elif time.monotonic() - last_print >= 10:
                    print(progress_line(view), file=sys.stderr, flush=True)
                    last_print = time.monotonic()
                if proc is None:
                    time.sleep(1.0)
                else:  # the next look comes at once when the coordinator exits (a job that just ended)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=1.0)
            if display is not None:
                display.update(view)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _err(f"stopped watching; job {job_id} keeps running. `slurmctl status {job_id}` shows where it is")
        return EXIT_DETACHED
    if display is None:
        print(progress_line(view)[:160], file=sys.stderr)
    if proc is not None:
        try:  # it exits within seconds of the job's end; the bound is for a coordinator stuck after it
            proc.wait(timeout=COORDINATOR_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            _err(f"the coordinator (pid {proc.pid}) is still running {COORDINATOR_EXIT_WAIT_S} s after job "
                 f"{job_id} ended; not waiting for it (see {log})")
    # The command ends with this answer: spare the interpreter's shutdown its full garbage collections over the
    # ~150k objects the imports left (over 1 s on a busy 2-core machine). Everything is still freed at exit.
    gc.freeze()
    if view["status"] == "completed":
        superseded = view.get("duplicate_items") or 0
        print(f"job {job_id} completed: {view['items_succeeded']} items ok, {view['items_failed']} failed, "
              f"{view['items_rejected']} rejected"
              + (f" ({superseded} repeated id(s) superseded by their last occurrence)" if superseded else "")
              + f"; output {view['output']}", file=sys.stderr)
        code = EXIT_OK
    else:
        _err(f"job {job_id} {view['status']}: {view['error']}" + (f" (log: {log})" if log else ""))
        code = EXIT_FAILED
    for advice in view.get("advice") or []:  # why it spent less of its rate limits than it could
        print(f"note: {advice}", file=sys.stderr)
    return code


def flow_run_link(server: dict[str, Any] | None, previous_run: str | None
                  ) -> Callable[[dict[str, Any]], None] | None:
    """For ``watch``: print ``Prefect UI: <flow run page>`` once, when the job manifest names a flow run other than
    ``previous_run`` (a resumed job's manifest still names the old one until the new coordinator starts)."""
    if not server:
        return None
    from slurmctl import prefect_server

    shown = False

    def announce(view: dict[str, Any]) -> None:
        nonlocal shown
        run = view.get("flow_run_id")
        if not shown and run and run != previous_run:
            shown = True
            link = prefect_server.flow_run_url(server, run)
            # on a terminal this lands above the live progress bar (rich redirects stderr while it shows)
            print(f"Prefect UI: {link}", file=sys.stderr, flush=True)

    return announce
