"""How a job's progress is shown: the status lines (speed, phases), the plain ``--wait`` line off a terminal, and on
a terminal a ``rich.progress`` bar fed from the job's status view.

Rich (a dependency of Prefect) redraws the bar in place, fits it to the terminal's width and keeps lines printed
meanwhile (the Prefect UI link, an error) above it. The numbers are the status view's (``books.progress``: items done
of the total, items/s, ETA, phase), exactly what ``slurmctl status`` and the plain lines (not a terminal) show.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(view: dict[str, Any]) -> str:
    """The ``--wait`` line when stderr is not a terminal (a terminal gets ``progress_display``'s live bar): a bar of
    the batches committed, the counters, items/s and ETA (``books.progress``)."""
    done, total = view["batches_done"], view["batches_total"]
    pct = 100.0 * done / total if total else 0.0
    width = 24
    bar = "#" * int(width * pct / 100) + "-" * (width - int(width * pct / 100))
    return (f"[{bar}] {pct:5.1f}% {view['phase']:<9} batches {done}/{total} failed {view['batches_failed']} "
            f"items ok {view['items_succeeded']} failed {view['items_failed']} rejected {view['items_rejected']} "
            f"{speed_text(view)}")


def speed_text(view: dict[str, Any]) -> str:
    """``123 items/s ETA 4m05s`` from a status view (``—`` where not yet known)."""
    rate, eta = view.get("items_per_s"), view.get("eta_s")
    return (f"{rate:,.1f} items/s" if rate is not None else "— items/s") + (
        f" ETA {_fmt_duration(eta)}" if eta is not None else "")


def phase_lines(view: dict[str, Any]) -> list[str]:
    """One line per phase of a status view: its state, share done and time."""
    out = []
    for p in view.get("phases") or []:
        share = f"{100 * p['share_done']:5.1f}%" if p.get("share_done") is not None else "     —"
        took = _fmt_duration(p["seconds"]) if p.get("seconds") is not None else ""
        out.append(f"  {p['phase']:<10} {p['state']:<9} {share}  {took}".rstrip())
    return out


class TerminalProgress:
    """A live progress bar for one job: ``update(view)`` with each status view, as a context manager."""

    def __init__(self, job_id: str, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False), TextColumn("{task.fields[phase]:<9}"),
            BarColumn(), TaskProgressColumn(), MofNCompleteColumn(), TextColumn("items"),
            TextColumn("{task.fields[speed]}", markup=False), TextColumn("{task.fields[counts]}", markup=False),
            console=console or Console(stderr=True), refresh_per_second=4)
        self.task = self.progress.add_task(job_id, total=None, phase="", speed="", counts="")

    def update(self, view: dict[str, Any]) -> None:
        total = view.get("items_total") or None  # 0 until the partition phase has counted the input
        self.progress.update(
            self.task, completed=view.get("items_done") or 0, total=total, phase=view.get("phase", ""),
            speed=speed_text(view),
            counts=f"batches {view.get('batches_done', 0)}/{view.get('batches_total', 0)} failed "
                   f"{view.get('batches_failed', 0)}, items failed {view.get('items_failed', 0)} rejected "
                   f"{view.get('items_rejected', 0)}")
        self.progress.refresh()

    def __enter__(self) -> TerminalProgress:
        self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()


class NotebookProgress:
    """In a Jupyter notebook: the plain progress line, rewritten in place in the cell's output (a carriage return
    before each, which notebook front ends apply, as tqdm does without widgets): no IPython or widget import."""

    def __init__(self, job_id: str, out: TextIO | None = None) -> None:
        self.job_id = job_id
        self.out = out or sys.stdout
        self.last = ""

    def update(self, view: dict[str, Any]) -> None:
        line = f"{self.job_id}  {progress_line(view)}"
        if line != self.last:
            self.out.write("\r" + line)
            self.out.flush()
            self.last = line

    def __enter__(self) -> NotebookProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.last:
            self.out.write("\n")
            self.out.flush()
