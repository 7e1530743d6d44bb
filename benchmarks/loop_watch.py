"""What the loop watch counts as held, for loops whose steps are shorter and longer than a held step (issue 22).

    .venv/bin/python benchmarks/loop_watch.py
    .venv/bin/python benchmarks/loop_watch.py --loops 1x60 400x0.2 1x300 --seconds 2 --runs 2

A worker process's ``LoopWatch`` (``slurmctl/loop_watch.py``) watches an event loop in a thread of its own, as in a
worker (``slurmctl.inflight``). On it, ``K`` items each compute ``S`` ms per step (on the wall clock) and yield,
for about ``--seconds`` in all. A step of ``LoopWatch.HELD_S`` (0.1 s) or more holds the loop; shorter steps do
not, however long a round of the loop takes (``K x S``). Prints one JSON object per loop and run: ``held_s``, the
seconds counted as held, beside ``seconds``, the time the loop ran. No Prefect, no job: the watch alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

from slurmctl.loop_watch import LoopWatch, new_event_loop


async def item(step_s: float, steps: int) -> None:
    for _ in range(steps):
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def items(count: int, step_s: float, steps: int) -> None:
    await asyncio.gather(*(item(step_s, steps) for _ in range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=["1x60", "1x90", "2x30", "3x20", "400x0.2", "1x150", "1x300"],
                        help="KxS: K items computing S ms per step")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    loop, rounds = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    watch = LoopWatch(thread, rounds)
    for run in range(args.runs):
        for spec in args.loops:
            count, step_ms = int(spec.split("x")[0]), float(spec.split("x")[1])
            steps = max(1, round(args.seconds / (step_ms / 1000) / count))
            entry = watch.join(f"{spec}-{run}", item)
            start = time.monotonic()
            asyncio.run_coroutine_threadsafe(items(count, step_ms / 1000, steps), loop).result()
            print(json.dumps({"items": count, "step_ms": step_ms, "run": run + 1,
                              "seconds": round(time.monotonic() - start, 3), "held_s": round(watch.leave(entry), 3)}),
                  flush=True)
    watch.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


if __name__ == "__main__":
    main()
