"""What the loop watch counts as held, for loops whose steps are shorter and longer than a held step (issue 22).

    .venv/bin/python benchmarks/loop_watch.py
    .venv/bin/python benchmarks/loop_watch.py --loops 1x60 400x0.2 1x300 --seconds 2 --runs 2

A worker process's event loop and its ``LoopWatch`` (``slurmctl.inflight.EventLoopThread``). On it, ``K`` items
each compute ``S`` ms per step (on the wall clock) and yield (the tests' ``many_short_steps``), for about
``--seconds`` in all. A step of ``LoopWatch.HELD_S`` (0.1 s) or more holds the loop; shorter steps do
not, however long a round of the loop takes (``K x S``). Prints one JSON object per loop and run: ``held_s``, the
seconds counted as held, beside ``seconds``, the time the loop ran. No Prefect, no job: the watch alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from support.sample_handlers import many_short_steps  # noqa: E402

from slurmctl.inflight import EventLoopThread  # noqa: E402


class Ctx:
    """What ``many_short_steps`` reads of a batch's context: its params."""

    def __init__(self, steps: int, step_ms: float) -> None:
        self.params = {"steps": steps, "step_ms": step_ms}


async def items(count: int, ctx: Ctx) -> None:
    await asyncio.gather(*(many_short_steps({"id": i}, ctx) for i in range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=["1x60", "1x90", "2x30", "3x20", "400x0.2", "1x150", "1x300"],
                        help="KxS: K items computing S ms per step")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    worker = EventLoopThread()  # a worker process's loop and its watch
    for run in range(args.runs):
        for spec in args.loops:
            count, step_ms = int(spec.split("x")[0]), float(spec.split("x")[1])
            steps = max(1, round(args.seconds / (step_ms / 1000) / count))
            entry = worker.watch.join(f"{spec}-{run}", many_short_steps)
            start = time.monotonic()
            worker.run(items(count, Ctx(steps, step_ms)))
            print(json.dumps({"items": count, "step_ms": step_ms, "run": run + 1,
                              "seconds": round(time.monotonic() - start, 3),
                              "held_s": round(worker.watch.leave(entry), 3)}), flush=True)
    worker.stop()

if __name__ == "__main__":
    main()
