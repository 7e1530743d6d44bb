"""The ``--wait`` progress display on a terminal: a ``rich.progress`` bar fed from the job's status view.

Rich (a dependency of Prefect) redraws the bar in place, fits it to the terminal's width and keeps lines printed
meanwhile (the Prefect UI link, an error) above it. The numbers are the status view's (``books.progress``: items done
of the total, items/s, ETA, phase), exactly what ``slurmctl status`` and the plain lines (not a terminal) show.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

from slurmctl.cli.commands import speed_text


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
