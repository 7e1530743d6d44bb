"""How much of a strict API's quota the DynamoDB rate limiter uses, and at what cost, next to Prefect's rate_limit().

    .venv/bin/python benchmarks/rate_limiter.py --workers 16 --rate 50 --seconds 20 --json

One run, on this machine only (127.0.0.1):

* a strict API server: its own token bucket at ``rate`` req/s (capacity ``--api-burst``), answering 429 above it;
* limiter state in DynamoDB on a moto server (real boto3 over HTTP), signals (pause/rate/throttle epochs) in an S3
  bucket on the same server, polled by each worker about once a second (reported as ``signal_gets_per_s``);
* ``--workers`` processes, each spending tokens as fast as they are granted (``Leaser.acquire()`` then one GET);
* then the same workload gated by Prefect's own ``rate_limit()`` (a global concurrency limit with
  ``slot_decay_per_second=rate`` on a local Prefect server).

Prints ``{"rate", "achieved_per_s", "utilisation", "over_limit_responses", "dynamodb_calls_per_token",
"prefect_rate_limit_utilisation", ...}``. Steady state excludes the first second (process start-up).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from support.servers import BIN, free_port, moto_command, wait_http  # noqa: E402


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def started(start: tuple) -> float:
    """Report ready (imports and clients done), then wait for the common start time the parent sets."""
    ready, at = start
    ready.put(os.getpid())
    while at.value == 0:
        time.sleep(0.01)
    while time.time() < at.value:
        time.sleep(0.005)
    return at.value


def slurmctl_worker(args: dict, start: tuple, out: str) -> None:
    """Spend tokens from the DynamoDB limiter as fast as granted; one GET per token."""
    sys.path[:0] = [str(ROOT)]
    from slurmctl.blocks.manifest_store import store_from_uri
    from slurmctl.blocks.rate_limiter import limiter_from_config
    from slurmctl.ratelimit.lanes import LimitSpec
    from slurmctl.ratelimit.leaser import Leaser

    signals = store_from_uri(args["signals"], endpoint_url=args["endpoint"], region="us-east-1")
    backend = limiter_from_config("dynamodb", table=args["table"], endpoint_url=args["endpoint"], region="us-east-1",
                                  signals=signals)
    calls, signal_calls = [0], [0]
    backend._client().meta.events.register("before-call.dynamodb", lambda **kw: calls.__setitem__(0, calls[0] + 1))
    signals._s3().meta.events.register("before-call.s3", lambda **kw: signal_calls.__setitem__(0, signal_calls[0] + 1))
    leaser = Leaser(backend, "bench", LimitSpec(per_second=args["rate"], burst=args["burst"],
                                                lease_size=args["lease_size"], lanes=args["lanes"],
                                                workers=args["workers"]))
    signals.get_json("warm-up")  # clients created before the clock runs (the first lease reads the item)
    start_at = started(start)
    results = []
    while time.time() < start_at + args["seconds"]:
        leaser.acquire()
        results.append((time.time(), get(args["api"])))
        time.sleep(args["work_s"])  # the rest of a handler's work per request (--work-ms)
    # No leaser.close(): like a job's worker process, it keeps its leases to the end; their tails just pass.
    with open(out, "w") as f:
        json.dump({"results": results, "dynamodb_calls": calls[0], "signal_calls": signal_calls[0],
                   "lanes_wanted": leaser.wanted_lanes(), "granted": leaser.granted,
                   "expired": leaser.expired, "lease_calls": leaser.backend_calls, "waited_s": leaser.waited_s}, f)


def prefect_worker(args: dict, start: tuple, out: str) -> None:
    """The same workload gated by Prefect's rate_limit() on a global concurrency limit."""
    from prefect.concurrency.sync import rate_limit

    start_at = started(start)
    results = []
    while time.time() < start_at + args["seconds"]:
        rate_limit("bench-limit", occupy=1)
        results.append((time.time(), get(args["api"])))
    with open(out, "w") as f:
        json.dump({"results": results}, f)


def run_workers(target, args: dict, workers: int, tmp: Path, tag: str, env: dict | None = None) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        # The clock starts once every process has imported and connected (16 spawns take many seconds on 2 cores).
        ready, at = ctx.Queue(), ctx.Value("d", 0.0)
        procs = [ctx.Process(target=target, args=(args, (ready, at), str(tmp / f"{tag}-{i}.json")))
                 for i in range(workers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        at.value = time.time() + 0.5
        for p in procs:
            p.join(args["seconds"] + 120)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return [json.loads((tmp / f"{tag}-{i}.json").read_text()) for i in range(workers)]


def steady(results: list[dict], seconds: float, warmup: float = 1.0) -> tuple[list, float]:
    pairs = sorted(r for w in results for r in w["results"])
    if not pairs:
        return [], 0.0
    t0 = pairs[0][0]
    return [p for p in pairs if p[0] >= t0 + warmup], seconds - warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--burst", type=int, default=5, help="the limit's declared burst (the API's, by default)")
    parser.add_argument("--api-burst", type=float, default=5, help="the API's bucket capacity")
    parser.add_argument("--work-ms", type=float, default=0, help="a handler's other work per request (slow workers)")
    parser.add_argument("--lease-size", type=int, default=16)
    parser.add_argument("--lanes", type=int, default=None, help="default: one per 1.25 req/s, at most 64")
    parser.add_argument("--skip-prefect", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from support.chaos_api import ChaosApi

    class StrictApi(ChaosApi):
        def _capacity(self) -> float:
            return args.api_burst

    tmp = Path(tempfile.mkdtemp(prefix="slurmctl-ratebench-"))
    moto_port = free_port()
    moto = subprocess.Popen(moto_command(moto_port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    out: dict = {"rate": args.rate, "workers": args.workers, "seconds": args.seconds, "lease_size": args.lease_size,
                 "limiter_burst": args.burst, "api_burst": args.api_burst, "work_ms": args.work_ms}
    try:
        endpoint = f"http://127.0.0.1:{moto_port}"
        wait_http(endpoint + "/moto-api/", 60)
        from slurmctl.blocks.rate_limiter import limiter_from_config

        limiter = limiter_from_config("dynamodb", table="bench-limits", endpoint_url=endpoint, region="us-east-1")
        limiter.ensure_table()
        from slurmctl.ratelimit.lanes import LimitSpec

        # as a job does before its workers start (slurmctl.books.limits.ensure_limits)
        limiter.ensure_limit("bench", LimitSpec(per_second=args.rate, burst=args.burst, lease_size=args.lease_size,
                                                lanes=args.lanes))
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench-signals")
        with StrictApi(max_per_second=args.rate) as api:
            wargs = {"table": "bench-limits", "endpoint": endpoint, "rate": args.rate, "burst": args.burst,
                     "lease_size": args.lease_size, "lanes": args.lanes, "seconds": args.seconds,
                     "api": api.url + "/items/1", "signals": "s3://bench-signals/job",
                     "work_s": args.work_ms / 1000, "workers": args.workers}
            results = run_workers(slurmctl_worker, wargs, args.workers, tmp, "slurmctl")
            pairs, span = steady(results, args.seconds)
            ok = sum(1 for _, status in pairs if status == 200)
            tokens = sum(len(w["results"]) for w in results)
            out.update(achieved_per_s=round(ok / span, 2), utilisation=round(ok / span / args.rate, 4),
                       over_limit_responses=sum(1 for _, s in pairs if s == 429),
                       over_limit_responses_incl_warmup=sum(1 for w in results for _, s in w["results"] if s == 429),
                       dynamodb_calls_per_token=round(sum(w["dynamodb_calls"] for w in results) / max(tokens, 1), 4),
                       signal_gets_per_s=round(sum(w["signal_calls"] for w in results) / args.seconds, 2),
                       lanes_wanted=sorted(w["lanes_wanted"] for w in results),
                       slots_granted=sum(w["granted"] for w in results),
                       slots_expired=sum(w["expired"] for w in results),
                       lease_calls=sum(w["lease_calls"] for w in results), tokens_used=tokens)
            if not args.skip_prefect:
                out.update(prefect_comparison(args, api, tmp))
    finally:
        moto.terminate()
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


def prefect_comparison(args: argparse.Namespace, api, tmp: Path) -> dict:
    port = free_port()
    home = tmp / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(url + "/health", 120)
        import asyncio

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def create() -> None:
            async with get_client() as client:
                await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                    name="bench-limit", limit=int(args.rate), slot_decay_per_second=args.rate))

        with temporary_settings(updates={PREFECT_API_URL: url}):
            asyncio.run(create())
        api.reset_counters()
        wargs = {"seconds": args.seconds, "api": api.url + "/items/1"}
        results = run_workers(prefect_worker, wargs, args.workers, tmp, "prefect", env={"PREFECT_API_URL": url})
        pairs, span = steady(results, args.seconds)
        ok = sum(1 for _, status in pairs if status == 200)
        return {"prefect_rate_limit_achieved_per_s": round(ok / span, 2),
                "prefect_rate_limit_utilisation": round(ok / span / args.rate, 4),
                "prefect_rate_limit_over_limit_responses": sum(1 for _, s in pairs if s == 429)}
    finally:
        server.terminate()


if __name__ == "__main__":  # required: worker processes are spawned
    main()
