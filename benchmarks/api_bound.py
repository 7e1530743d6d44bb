"""API-bound jobs: how much of a declared rate limit a job uses, with no concurrency number given by the user.

    .venv/bin/python benchmarks/api_bound.py --json
    .venv/bin/python benchmarks/api_bound.py --latency-ms 200 --rate 500 --handlers async --json   # one cell
    .venv/bin/python benchmarks/api_bound.py --rate --ceiling --json                                  # the ceiling only
    .venv/bin/python benchmarks/api_bound.py --latency-ms 200 --rate 500 --handlers async sync-auto --slurm --json
    .venv/bin/python benchmarks/api_bound.py --latency-ms 200 --rate 500 --handlers async --seconds 30 \
        --kill-worker-at 0.85 --json                                    # the tail a worker lost late in a job leaves
    .venv/bin/python benchmarks/api_bound.py --latency-ms 1000 --rate 500 --handlers async --seconds 30 --slurm \
        --late-worker-s 15 --json                                       # a Slurm worker that starts 15 s late

A local API (``api_server.py``: an ASGI app under uvicorn, in its own process) answers each ``GET /items/{id}`` after
L with its own token bucket of R/s, burst 5 (``--burst``; 429 above it). Per cell one job runs on the embedded
default (2 worker processes x 1 thread, ``slurmctl submit --wait``, one Prefect server for the run) with
``rate_limits`` declared exactly as the API's bucket, and one of three handlers:

* ``async``: ``slurmctl.handlers.http_json:AsyncClient`` (a class handler on ``httpx.AsyncClient``), concurrency auto
  (its default);
* ``sync-auto``: ``slurmctl.handlers.http_json:handle`` (urllib) with ``concurrency: auto`` (threads);
* ``sync-1``: the same handler one item at a time (``concurrency: 1``, the default for a sync handler);
* ``sync-keepalive`` (only when named in ``--handlers``): ``sync-auto`` with one kept-alive connection per thread
  (``keepalive_handler.py``, ``http.client``) instead of urllib's connection per request.

A cell's job has about ``--seconds`` of work at the rate it can reach. Printed per cell: the expected rate (R, or for
``sync-1`` the threads' ``2 / L`` when lower), the achieved rate in steady state (1 s buckets counted at the API, the
first and last 2 s left out), ``utilisation`` (achieved / R), the 429 share, the API's most requests in flight, and
the concurrency the workers reached (their batches' metrics). ``--ceiling`` adds R = inf, L = 0 (what one worker
process reaches) beside a bare httpx/asyncio client loop against the same server in the same run.
``--bare-limiter`` adds, per cell, the same limit spent by 2 bare processes through the product's leaser and
``ctx.limit`` (a fixed rate x latency in flight, no Prefect, Dask, batches or gate): what the limiter reaches here.
``--bare-paced [SHARE ...]`` adds, per cell, 2 bare processes sending plain httpx requests at exact, evenly spaced
times (SHARE of R in all, 0.9 by default) with no limiter at all: how many of them the API answers 429 when nothing
but the machine's own timing decides when they leave, and the CPU a request costs a process sending at a steady pace.
``--kill-worker-at SHARE`` SIGKILLs one worker process of each cell's job once the API has answered SHARE of its items
(embedded default only) and prints the API's counts from then on (``after_kill_per_s``).
``--late-worker-s SECONDS`` (with ``--slurm``) holds the second worker job pending until SECONDS after the first runs:
a blocker job keeps the node's memory but room for one worker job (``LateWorker``).

The API runs at real-time priority where the machine allows it (``api_priority`` in the output; else the highest
nice level allowed): its bucket judges a request by when the API's process reads it, and on 2 cores shared with the
job an API descheduled for a few ms reads the requests sent meanwhile together and answers the bucket's overflow 429
(at 2000/s, burst 5 absorbs 2 ms). An API on its own servers does not stall with its clients' load. Each cell also
prints the API's own stalls (``api_lag``) and the 429s answered within 20 ms of one. For the same reason the API
collects its garbage only between cells (its peak memory: ``api_rss_max_mb``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from support.jobs import write_config  # noqa: E402
from support.servers import benchmark_env, free_port, start_prefect_server, stop, wait_http  # noqa: E402

HANDLERS = {
    "async": ("slurmctl.handlers.http_json:AsyncClient", {}),
    "sync-auto": ("slurmctl.handlers.http_json:handle", {"concurrency": "auto"}),
    "sync-1": ("slurmctl.handlers.http_json:handle", {}),
    "sync-keepalive": ("keepalive_handler:handle", {"concurrency": "auto"}),  # not in the default matrix
}


def api_get(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def steady(per_second: list[list[int]]) -> list[int]:
    """The 1 s buckets between the first and last request, the first and last 2 s left out."""
    if not per_second:
        return []
    counts = dict(per_second)
    first, last = min(counts), max(counts)
    return [counts.get(s, 0) for s in range(first + 2, last - 1)]


def job_metrics(folder: Path, job_id: str) -> dict:
    from slurmctl.blocks.manifest_store import store_from_uri

    store = store_from_uri(str(folder / "state"))
    out = {"in_flight_max": 0, "concurrency_max": 0, "batches": 0, "items_deferred": 0, "items_failed": 0}
    tokens = calls = expired = late = 0
    held = 0.0  # seconds an async handler held a worker's event loop (slurmctl.loop_watch): 0 for a handler that awaits
    for key in store.list_keys(f"jobs/{job_id}/tasks/"):
        task = store.get_json(key) or {}
        m = task.get("metrics") or {}
        out["batches"] += 1  # a retry round's batches too: items deferred or failed in a batch go to one
        out["items_deferred"] += task.get("items_deferred") or 0
        out["items_failed"] += task.get("items_failed") or 0
        out["in_flight_max"] = max(out["in_flight_max"], m.get("in_flight_max") or 1)
        out["concurrency_max"] = max(out["concurrency_max"], m.get("concurrency") or 1)
        if m.get("concurrency_needed"):  # max_concurrency held the worker below what the limit needs
            out["concurrency_needed"] = max(out.get("concurrency_needed", 0), m["concurrency_needed"])
        tokens += m.get("ratelimit_api_tokens") or 0
        calls += m.get("ratelimit_api_backend_calls") or 0
        expired += m.get("ratelimit_api_expired") or 0
        late += m.get("ratelimit_api_late") or 0
        held += m.get("loop_held_s") or 0
    out["loop_held_s"] = round(held, 3)
    if tokens:
        out["limiter_calls_per_token"] = round(calls / tokens, 4)
        out["limiter_expired_slots"] = expired
        out["limiter_late_slots"] = late  # of those, the ones whose caller came too late (a busy worker)
    state = _limit_state(folder / "state" / "rate-limits.sqlite", f"{job_id}/api")
    if state is not None:  # a quota change seen (429s close together): the shared rate was halved this often
        out["limiter_rate_decreases"] = state.decreases
        out["limiter_429_reported"] = state.throttled
    return out


def _limit_state(path: Path, key: str):
    from slurmctl.blocks.rate_limiter import limiter_from_config

    return limiter_from_config("local", path=str(path)).read(key) if path.exists() else None


class WorkerKiller:
    """``--kill-worker-at SHARE``: SIGKILL one of the embedded default's worker processes (a child of the job's
    forkserver, ``slurmctl.flows.local_workers``) once the API has answered SHARE of the cell's items, and afterwards
    the API's per-second counts from that second on: the tail a lost worker leaves."""

    def __init__(self, api: str, items: int, share: float) -> None:
        import threading

        self.api, self.threshold = api, share * items
        self.pid: int | None = None
        self.second: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @staticmethod
    def _worker() -> int | None:
        import psutil

        for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
            try:
                if "multiprocessing.forkserver" in " ".join(psutil.Process(proc.info["ppid"]).cmdline()):
                    return proc.info["pid"]
            except (psutil.Error, OSError):
                continue
        return None

    def _watch(self) -> None:
        import signal

        while not self._done.wait(0.1):
            try:
                if api_get(f"{self.api}/stats").get("ok", 0) < self.threshold:
                    continue
            except OSError:
                continue
            self.pid = self._worker()
            if self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)
                self.second = int(time.monotonic())  # the API's buckets are its process's monotonic seconds
            return

    def result(self) -> dict:
        self._done.set()
        self._thread.join()
        if self.second is None:
            return {"killed_worker": None}
        tail = [n for s, n in api_get(f"{self.api}/stats").get("per_second") or [] if s >= self.second]
        return {"killed_worker": self.pid, "after_kill_s": len(tail), "after_kill_per_s": tail}


class LateWorker:
    """``--late-worker-s SECONDS`` (with ``--slurm``): the cell's second worker job starts SECONDS after its first.

    Before the job, a blocker job holds the node's free memory but room for one worker job (the config's default
    ``memory``, which dask-jobqueue asks in MiB: ``--mem=954M`` for 1GB), so Slurm starts the first worker job and
    leaves the second pending on Resources; SECONDS after the first runs, the blocker is cancelled and Slurm starts
    the second (within its scheduler's next pass). What a worker that arrives late on a busy cluster leaves to
    balance."""

    def __init__(self, job_id: str, seconds: float) -> None:
        import threading

        from dask.utils import parse_bytes

        from slurmctl.config import SlurmClusterConfig
        from slurmctl.slurm import slurm_job_name

        node = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, check=True).stdout
        fields = dict(f.split("=", 1) for f in node.split() if "=" in f)
        free = int(fields["RealMemory"]) - int(fields.get("AllocMem", 0))
        worker_mb = math.ceil(parse_bytes(SlurmClusterConfig.model_fields["memory"].default) / 2**20)
        hold = free - worker_mb * 3 // 2
        self.blocker = subprocess.run(["sbatch", "--parsable", f"--mem={hold}M", "-c", "1", "-o", "/dev/null",
                                       "-J", "bench-blocker", "--wrap", "sleep 3600"],
                                      capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
        self.name, self.seconds = slurm_job_name(job_id), seconds
        self.started: list[float] = []  # monotonic times at which each worker job was first seen running
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _running(self) -> set[str]:
        from slurmctl.slurm import jobs_named

        return {row[0] for row in jobs_named(self.name, running=True)}

    def _watch(self) -> None:
        seen: set[str] = set()
        released = False
        while not self._done.wait(0.2) and len(seen) < 2:
            new = self._running() - seen
            self.started += [time.monotonic()] * len(new)
            seen |= new
            if self.started and not released and time.monotonic() - self.started[0] >= self.seconds:
                subprocess.run(["scancel", self.blocker], capture_output=True)
                released = True

    def result(self) -> dict:
        self._done.set()
        self._thread.join()
        subprocess.run(["scancel", self.blocker], capture_output=True)
        gap = round(self.started[1] - self.started[0], 1) if len(self.started) > 1 else None
        return {"late_worker_s": self.seconds, "second_worker_after_s": gap}


def run_cell(args: argparse.Namespace, env: dict, tmp: Path, api: str, handler: str, latency_ms: float,
             rate: float | None, cap: int = 0) -> dict:
    """One job against the API answering after ``latency_ms`` through a bucket of ``rate``/s, declared as the job's
    limit; or, with ``cap``, an API that takes at most ``cap`` calls at once and a job that declares no limit (the
    most it can do: ``cap / latency`` calls a second)."""
    latency = latency_ms / 1000
    reach = cap / latency if cap else rate or args.ceiling_rate
    if handler == "sync-1" and latency > 0:
        reach = min(reach, 2 / latency)
    items = int(max(20, min(args.max_items, reach * args.seconds)))
    batch = max(5, min(1000, items // 40))
    if rate and latency and handler != "sync-1":
        # A worker thread's items in flight are its batch's: two workers holding one batch each must have
        # rate x latency in flight between them, with room for each batch's tail (Little's law, x 2).
        batch = max(batch, min(1000, math.ceil(rate * latency)))
        items = max(items, 10 * batch)
    job_id = f"api-{handler}-{int(latency_ms)}ms-{int(rate or 0)}{f'-cap{cap}' if cap else ''}-{os.urandom(2).hex()}"
    folder = tmp / job_id
    folder.mkdir()
    (folder / "in.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(items)))
    spec, extra = HANDLERS[handler]
    fields = dict(extra)
    if args.max_concurrency and handler != "sync-1":
        fields["max_concurrency"] = args.max_concurrency
    if args.slurm:
        fields["cluster"] = {"kind": "slurm", "queue": "debug", "cores": 1, "processes": 1, "min_jobs": 2,
                             "max_jobs": 2}
    params = {"base_url": api}
    if rate:
        params["limit"] = "api"
        fields["rate_limits"] = {"api": {"per_second": rate, "burst": args.burst}}
    api_get_post(f"{api}/config?latency={latency}&rate={rate or 0}&burst={args.burst}&cap={cap}")
    cfg = write_config(folder / "job.yaml", job_id=job_id, handler=spec, input={"uri": "in.jsonl"}, batch_size=batch,
                       params=params, storage={"uri": "state"}, errors={"max_attempts": args.max_attempts}, **fields)
    killer = WorkerKiller(api, items, args.kill_worker_at) if args.kill_worker_at else None
    late = LateWorker(job_id, args.late_worker_s) if args.slurm and args.late_worker_s else None
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "slurmctl.cli", "submit", str(cfg), "--wait"], cwd=folder,
                              env=env, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - started
    finally:
        late_result = late.result() if late is not None else {}  # the blocker job goes, whatever happened
    achieved, at_api = measured_at_api(api, rate)
    if killer is not None:
        at_api.update(killer.result())
    at_api.update(late_result)
    if cap:  # the share of what the cap allows
        at_api["utilisation"] = round(achieved / reach, 3)
    out = {"handler": handler, "latency_ms": latency_ms, "rate": rate, **({"cap": cap} if cap else {}),
           "items": items, "batch_size": batch,
           "job_exit": done.returncode, "job_seconds": round(wall, 1), "expected_per_s": round(reach, 1),
           "of_expected": round(achieved / reach, 3), **at_api, **job_metrics(folder, job_id)}
    if done.returncode != 0:
        out["stderr"] = done.stderr[-1500:]
    return out


def measured_at_api(api: str, rate: float | None) -> tuple[float, dict]:
    """What the API counted since its counters were cleared: the steady rate (requests/s), and as a cell's fields
    that rate, the utilisation of ``rate``, the steady per-second counts, the requests, the 429s and their share,
    and the most requests it had in flight."""
    stats = api_get(f"{api}/stats")
    buckets = steady(stats.get("per_second") or [])
    achieved = sum(buckets) / len(buckets) if buckets else 0.0
    return achieved, {"achieved_per_s": round(achieved, 1),
                      "utilisation": round(achieved / rate, 3) if rate else None,
                      "steady_seconds": len(buckets), "steady_per_s": buckets,
                      "requests": stats.get("requests", 0), "responses_429": stats.get("429", 0),
                      "share_429": round(stats.get("429", 0) / max(1, stats.get("requests", 0)), 5),
                      "api_in_flight_max": stats.get("in_flight_max"), "api_lag": stats.get("lag"),
                      "api_rss_max_mb": stats.get("rss_max_mb")}


def client_pools(in_flight: int, pool: int = 1) -> list:
    """``httpx.AsyncClient``s of ``pool`` connections each, enough for ``in_flight`` requests: one each, as the
    ``AsyncClient`` handler opens them (an httpx pool's per-request cost grows with its connections)."""
    import httpx

    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    return [httpx.AsyncClient(limits=limits, timeout=30) for _ in range(max(1, in_flight // pool))]


def api_get_post(url: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=30).read()


def bare_client(api: str, seconds: float, in_flight: int, pool: int = 1) -> float:
    """Requests/s a bare asyncio loop of ``httpx.AsyncClient`` calls reaches against the server (no limit, no latency):
    one core's physical limit for this client. Its connections are split over pools of ``pool`` (one each, as the
    ``AsyncClient`` handler does: an httpx pool's per-request cost grows with its connections)."""
    async def main() -> float:
        done = 0
        stop_at = time.monotonic() + seconds
        clients = client_pools(in_flight, pool)

        async def worker(k: int) -> None:
            nonlocal done
            i, client = k, clients[k % len(clients)]
            while time.monotonic() < stop_at:
                (await client.get(f"{api}/items/{i}")).raise_for_status()
                done += 1
                i += in_flight
        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        for client in clients:
            await client.aclose()
        return done / (time.monotonic() - t0)

    return asyncio.run(main())


def _in_processes(target: Any, args: list[tuple], timeout_s: float) -> list[dict]:
    """Run ``target(*a, queue)`` in a spawned process for each ``a`` of ``args``; each puts one dict with its
    ``process`` number on the queue. Their dicts, in process order."""
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    runs = [mp.Process(target=target, args=(*a, results)) for a in args]
    for proc in runs:
        proc.start()
    out = [results.get(timeout=timeout_s) for _ in runs]
    for proc in runs:
        proc.join()
    return sorted(out, key=lambda r: r["process"])


def _bare_limited(api: str, k: int, spec: dict, db: str, in_flight: int, start: float, seconds: float,
                  out: Any) -> None:
    """One process of ``bare_limiter``: ``in_flight`` coroutines, each taking a token through ``ctx.limit`` (the
    product's leaser on the same SQLite file as the other process) and then calling the API."""
    from slurmctl.blocks.rate_limiter import limiter_from_config
    from slurmctl.handler import BatchContext
    from slurmctl.ratelimit.lanes import LimitSpec
    from slurmctl.ratelimit.leaser import Leaser

    leaser = Leaser(limiter_from_config("local", path=db), "bare/api", LimitSpec(**spec))
    ctx = BatchContext("bare", "bare", params={}, limiters={"api": leaser})

    async def run() -> int:
        clients = client_pools(in_flight)
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        stop_at, done = start + seconds, 0

        async def worker(j: int) -> None:
            nonlocal done
            i = j * 1_000_000 + k
            while time.monotonic() < stop_at:
                async with ctx.limit("api"):
                    await clients[j % len(clients)].get(f"{api}/items/{i}")
                done, i = done + 1, i + 1
        await asyncio.gather(*(worker(j) for j in range(in_flight)))
        for client in clients:
            await client.aclose()
        return done

    out.put({"process": k, "requests": asyncio.run(run()), "expired_slots": leaser.expired + leaser.claim_expired})


def bare_limiter(api: str, tmp: Path, latency_ms: float, rate: float, seconds: float, procs: int = 2,
                 burst: int = 5) -> dict:
    """The cell's limit spent by ``procs`` bare processes (no Prefect, no Dask, no batches, no gate: a fixed rate x
    latency in flight, plus a queue), through the product's leaser: what the limiter itself reaches on this machine,
    beside the jobs."""
    from slurmctl.blocks.rate_limiter import limiter_from_config
    from slurmctl.ratelimit.lanes import LimitSpec

    spec = {"per_second": rate, "burst": burst, "workers": procs}
    db = str(tmp / f"bare-{os.urandom(3).hex()}.sqlite")
    limiter_from_config("local", path=db).ensure_limit("bare/api", LimitSpec(**spec))
    api_get_post(f"{api}/config?latency={latency_ms / 1000}&rate={rate}&burst={burst}")
    in_flight = math.ceil(rate * latency_ms / 1000 / procs * 1.25) + 4
    start = time.monotonic() + 3.0  # the processes' imports first
    per_process = _in_processes(_bare_limited, [(api, k, spec, db, in_flight, start, seconds) for k in range(procs)],
                                seconds + 120)
    return {"handler": "bare-limiter", "latency_ms": latency_ms, "rate": rate, "processes": procs,
            "in_flight_per_process": in_flight, **measured_at_api(api, rate)[1],
            "expired_slots": sum(r["expired_slots"] for r in per_process)}


def _bare_paced(api: str, k: int, procs: int, total_per_s: float, in_flight: int, start: float, seconds: float,
                out: Any) -> None:
    """One process of ``bare_paced``: a request at each of its evenly spaced times (the processes' times
    interleaved), each on a free client of one kept-alive connection, with no limiter and nothing else running."""
    import httpx

    async def run() -> tuple[int, float]:
        tls = httpx.create_ssl_context()
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        free = [httpx.AsyncClient(limits=one, timeout=30, verify=tls) for _ in range(in_flight)]
        clients, done, tasks = list(free), 0, set()

        async def call(i: int, at: float) -> None:
            nonlocal done
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if not free:  # more in flight than planned: the API or this process fell behind
                clients.append(httpx.AsyncClient(limits=one, timeout=30, verify=tls))
                free.append(clients[-1])
            client = free.pop()
            try:
                await client.get(f"{api}/items/{i}")
            finally:
                free.append(client)
            done += 1
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu, i = time.process_time(), 0
        while (at := start + (i * procs + k) / total_per_s) < start + seconds:
            while at > time.monotonic() + 0.05:  # keep 50 ms of calls scheduled ahead
                await asyncio.sleep(0.01)
            task = asyncio.ensure_future(call(i * procs + k, at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
        cpu = time.process_time() - cpu
        for client in clients:
            await client.aclose()
        return done, cpu

    done, cpu = asyncio.run(run())
    out.put({"process": k, "requests": done, "cpu_ms_per_request": round(1000 * cpu / max(1, done), 3)})


def bare_paced(api: str, latency_ms: float, rate: float, share: float, seconds: float, procs: int = 2,
               burst: int = 5) -> dict:
    """``share`` of the cell's rate sent by ``procs`` bare processes at exact, evenly spaced times: plain httpx, no
    limiter, no Prefect, Dask or batches. What this machine's clients reach on their own: the 429s are requests that
    left later than the API's burst allows (their process busy or descheduled), and the CPU each request costs a
    process sending at a steady pace."""
    api_get_post(f"{api}/config?latency={latency_ms / 1000}&rate={rate}&burst={burst}")
    in_flight = math.ceil(rate * share * latency_ms / 1000 / procs * 1.5) + 8
    start = time.monotonic() + 4.0  # the processes' imports and clients first
    per_process = _in_processes(_bare_paced, [(api, k, procs, rate * share, in_flight, start, seconds)
                                              for k in range(procs)], seconds + 120)
    return {"handler": "bare-paced", "latency_ms": latency_ms, "rate": rate, "sent_per_s": rate * share,
            "processes": procs, **measured_at_api(api, rate)[1],
            "cpu_ms_per_request": [r["cpu_ms_per_request"] for r in per_process]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-ms", type=float, nargs="+", default=[20, 200, 1000])
    p.add_argument("--rate", type=float, nargs="*", default=[50, 500, 2000])
    p.add_argument("--handlers", nargs="*", choices=list(HANDLERS), default=["async", "sync-auto", "sync-1"],
                   help="none: only the bare runs asked for")
    p.add_argument("--seconds", type=float, default=12, help="work per cell at the rate it can reach")
    p.add_argument("--max-attempts", type=int, default=10,
                   help="errors.max_attempts of each job (3 is the config's default): attempts per item in its batch")
    p.add_argument("--max-items", type=int, default=30000)
    p.add_argument("--ceiling", action="store_true", help="also R = inf, L = 0, beside a bare client loop")
    p.add_argument("--ceiling-rate", type=float, default=1500, help="items/s a ceiling cell is sized for")
    p.add_argument("--slurm", action="store_true",
                   help="workers on the real Slurm: 2 worker jobs of cores: 1 (scripts/slurm.sh up first)")
    p.add_argument("--bare-limiter", action="store_true",
                   help="per cell, also the limit spent by 2 bare processes through the product's leaser (no job)")
    p.add_argument("--bare-paced", type=float, nargs="*", metavar="SHARE",
                   help="per cell, also 2 bare processes sending plain httpx requests at exact times, SHARE of the "
                        "rate in all (0.9 if no SHARE given), with no limiter and no job")
    p.add_argument("--burst", type=int, default=5,
                   help="the API's bucket and the declared limit's burst: its room for the calls' jitter is "
                        "(burst - 1) / rate (5 at 2000/s: 2 ms)")
    p.add_argument("--max-concurrency", type=int,
                   help="the jobs' max_concurrency (the default, 256, unless given): 1 s answers at 2000/s need "
                        "1,000 in flight per worker process")
    p.add_argument("--cap", type=int, nargs="*", default=[],
                   help="per latency, also a job that declares no limit against an API taking at most CAP calls at "
                        "once (429 above it): utilisation is then of CAP / latency")
    p.add_argument("--kill-worker-at", type=float, metavar="SHARE",
                   help="SIGKILL one embedded worker process once the API has answered SHARE of a cell's items")
    p.add_argument("--late-worker-s", type=float, metavar="SECONDS",
                   help="with --slurm: the second worker job starts SECONDS after the first (a blocker job holds "
                        "the node's memory until then)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.late_worker_s and not args.slurm:
        p.error("--late-worker-s holds a Slurm worker job back: it needs --slurm")

    tmp = Path(tempfile.mkdtemp(prefix="bench-api-bound-"))
    env = benchmark_env(tmp, ROOT)
    procs, cells, api_priority = [], [], None
    try:
        procs.append(start_prefect_server(env, tmp / "prefect-home"))
        api_port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "api_server.py"), str(api_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        api = f"http://127.0.0.1:{api_port}"
        wait_http(api + "/stats", 60)
        api_priority = api_get(f"{api}/stats").get("priority")
        for latency in args.latency_ms:
            for rate in args.rate:
                for handler in args.handlers:
                    cell = run_cell(args, env, tmp, api, handler, latency, rate)
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
                if args.bare_limiter and rate:
                    cell = bare_limiter(api, tmp, latency, rate, args.seconds, burst=args.burst)
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
                shares = [] if args.bare_paced is None or not rate else args.bare_paced or [0.9]
                for share in shares:
                    cell = bare_paced(api, latency, rate, share, args.seconds, burst=args.burst)
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
            for cap in args.cap:
                for handler in args.handlers:
                    cell = run_cell(args, env, tmp, api, handler, latency, None, cap)
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
        ceiling = None
        if args.ceiling:
            api_get_post(f"{api}/config?latency=0&rate=0")
            tried = {n: round(bare_client(api, 5, n), 1) for n in (4, 16, 64)}
            bare = max(tried.values())
            cell = run_cell(args, env, tmp, api, "async", 0, None)
            ceiling = {"bare_httpx_per_s": round(bare, 1), "bare_by_in_flight": tried, "job": cell,
                       "job_share_of_bare": round(cell["achieved_per_s"] / bare, 3),
                       "note": "the job has 2 worker processes; the bare loop is one process"}
            print(json.dumps(ceiling), file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            stop(proc)
    workers = "2 Slurm worker jobs of cores: 1" if args.slurm else "2 processes x 1 thread (embedded default)"
    out = {"burst": args.burst, "workers": workers, "api_priority": api_priority, "cells": cells, "ceiling": ceiling}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
