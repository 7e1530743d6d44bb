"""A job of millions of items on the embedded default, end to end, as a user runs it (``slurmctl submit --wait``).

    .venv/bin/python benchmarks/scale.py --items 5000000 --batch-size 100 --json
    .venv/bin/python benchmarks/scale.py --items 5000000 --batch-size 100 --kill-at 0.5 --json   # resume at scale
    .venv/bin/python benchmarks/scale.py --items 200000 --batch-size 100 --s3 --json  # store requests on moto

No-op (echo) handler, 2-worker LocalCluster, local store, the persistent local Prefect server (UI enabled; started
if needed, left running). It checks that the output holds every item exactly once (reading its ``id`` column), that
every task run the job made is recorded in Prefect and Completed, and times what the flow run's page in the UI asks
the API for (the page itself, the task runs, the graph).

``--kill-at F``: once a fraction F of the batches committed, SIGKILL the coordinator's whole process group, then
``slurmctl resume --wait``; reports the seconds from starting ``resume`` to its first new commit, the batches
committed at the kill and how many the resumed run processed.

``--s3``: the store is a bucket on a moto server started here, behind a counting proxy: every object-store request
of every process (coordinator and workers), submit to completed, is counted by method.

``--files N``: the input is N gzip JSONL files under one folder (or S3 prefix with ``--s3``), read through a glob
(``part-*.jsonl.gz``). ``--batch-handler``: a vectorised pandas batch handler (``support.sample_handlers:
handle_batch``, ``batch_format: pandas``) instead of the per-item echo, timed against a one-pass pyarrow
read-transform-write of the same files in the same run (``baseline_s``, ``ratio`` = its rows/s over the baseline's).

Prints one JSON object: items, batches, task_runs, seconds, items_per_s, coordinator_peak_rss_mb,
store_requests_per_batch (None on the local store), and details.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from benchmarks.overhead import make_input  # noqa: E402


def cli(*args: str, env: dict[str, str], **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slurmctl.cli", *args], env=env, cwd=ROOT, **kw)


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Watcher(threading.Thread):
    """Follows the job manifest: the coordinator's pid and its peak RSS (VmHWM, sampled every second)."""

    def __init__(self, job_file: Path) -> None:
        super().__init__(daemon=True)
        self.job_file, self.peak, self.pids = job_file, 0.0, set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                pid = json.loads(self.job_file.read_text()).get("coordinator_pid")
            except (OSError, ValueError):
                continue
            if pid:
                self.pids.add(pid)
                self.peak = max(self.peak, peak_rss_mb(pid) or 0.0)


def commits(tasks_dir: Path) -> int:
    try:
        return sum(1 for n in os.listdir(tasks_dir) if n.endswith(".json") and not n.endswith(".failed.json"))
    except FileNotFoundError:
        return 0


def prefect_checks(api: str, job: dict[str, Any], batches: int) -> dict[str, Any]:
    """Task runs of the job in Prefect, and how long the flow run page's requests take."""
    import httpx

    parent = job["flow_run_id"]
    with httpx.Client(base_url=api, timeout=60) as c:
        subflows = c.post("/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": [parent]}}}).json()
        ids = [parent, *(f["id"] for f in subflows)]
        count = c.post("/task_runs/count", json={"flow_runs": {"id": {"any_": ids}}}).json()
        states: Counter[str] = Counter()
        offset = 0
        while True:
            page = c.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": ids}}, "limit": 200,
                                                     "offset": offset}).json()
            states.update(t["state"]["name"] if t.get("state") else "none" for t in page)
            if len(page) < 200:
                break
            offset += 200
        process = next((f["id"] for f in subflows if f["name"].endswith("process") or
                        f.get("flow_id") and "process" in f["name"]), subflows[0]["id"] if subflows else parent)
        timings = {}
        ui = api[:-len("/api")]
        t0 = time.perf_counter()
        page = httpx.get(f"{ui}/runs/flow-run/{parent}", headers={"Accept": "text/html"}, timeout=60)
        timings["ui_page_s"] = round(time.perf_counter() - t0, 3) if page.status_code == 200 else None
        for name, (method, path, body) in {
            "task_runs_filter_s": ("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [process]}},
                                                               "limit": 200, "sort": "EXPECTED_START_TIME_DESC"}),
            "task_runs_count_s": ("POST", "/task_runs/count", {"flow_runs": {"id": {"any_": [process]}}}),
            "graph_s": ("GET", f"/flow_runs/{parent}/graph-v2", None),
            "process_graph_s": ("GET", f"/flow_runs/{process}/graph-v2", None),
        }.items():
            t0 = time.perf_counter()
            r = c.request(method, path, json=body)
            r.raise_for_status()
            timings[name] = round(time.perf_counter() - t0, 3)
    return {"task_runs": count, "task_run_states": dict(states), "flow_runs": len(ids), "ui": timings}


def request_kind(method: str, path: str) -> str:
    """``GET tasks``, ``PUT outputs``...: the method and the part of the job's tree (or the bucket) it touches."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if len(parts) >= 5 and parts[1:3] == ["state", "jobs"]:
        where = parts[4] if len(parts) > 5 else parts[4].split(".")[0]
    elif "list-type" in path or "prefix=" in path:
        where = "list"
    else:
        where = "/".join(parts[1:2]) or "bucket"
    return f"{method} {where}"


def split_gzip(source: Path, folder: Path, files: int) -> None:
    """``source``'s lines over ``files`` gzip files of about equal size (part-00000.jsonl.gz, ...)."""
    import gzip

    folder.mkdir()
    lines = source.read_bytes().splitlines(keepends=True)
    per = -(-len(lines) // files)
    for i in range(files):
        with gzip.open(folder / f"part-{i:05d}.jsonl.gz", "wb", compresslevel=6) as f:
            f.writelines(lines[i * per:(i + 1) * per])


def one_pass(tmp: Path, files: int | None) -> float:
    """The baseline: read the same input with pyarrow, do the batch handler's transform, write one Parquet file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    paths = sorted((tmp / "day").iterdir()) if files else [tmp / "input.jsonl"]
    tables = []
    for path in paths:
        stream = pa.input_stream(str(path), compression="detect")
        table = pj.read_json(stream)
        tables.append(table.append_column("doubled", pc.multiply(table.column("id"), 2)))
    pq.write_table(pa.concat_tables(tables), str(tmp / "baseline.parquet"))
    return time.perf_counter() - t0


def check_output(path: str, items: int) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    ids = pq.read_table(path, columns=["id"]).column("id").to_numpy()
    assert len(ids) == items, f"{len(ids)} rows for {items} items"
    ids = np.sort(ids)
    assert np.array_equal(ids, np.arange(items)), "the output does not hold each id exactly once"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=5_000_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=None, help="SIGKILL the coordinator at this fraction")
    parser.add_argument("--s3", action="store_true", help="store on a moto server; count its requests")
    parser.add_argument("--files", type=int, default=None, help="split the input over this many gzip JSONL files")
    parser.add_argument("--batch-handler", action="store_true", help="a vectorised pandas batch handler")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()

    from slurmctl import prefect_server

    tmp = Path(tempfile.mkdtemp(prefix="slurmctl-scale-"))
    env = {"SLURMCTL_SPARE_COORDINATOR": "0", **os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("PREFECT_API_URL", None)
    api = prefect_server.ensure()  # the persistent local server (SLURMCTL_HOME), UI enabled
    make_input(tmp / "input.jsonl", args.items)
    if args.files:
        split_gzip(tmp / "input.jsonl", tmp / "day", args.files)
    job_id = f"scale-{args.items}-{int(time.time())}"
    config: dict[str, Any] = {"job_id": job_id, "handler": "slurmctl.handlers.echo:handle",
                              "input": {"uri": str(tmp / "day/part-*.jsonl.gz") if args.files else
                                        str(tmp / "input.jsonl")},
                              "batch_size": args.batch_size, "cluster": {"kind": "local", "n_workers": args.workers}}
    if args.batch_handler:
        config.update(handler="support.sample_handlers:handle_batch", batch_format="pandas")
    baseline_s = one_pass(tmp, args.files) if args.batch_handler else None
    proxy = moto = None
    if args.s3:
        import boto3
        from support.fault_proxy import FaultProxy
        from support.servers import free_port, moto_command, stop, wait_http

        port = free_port()
        moto = subprocess.Popen(moto_command(port),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 60, moto)
        proxy = FaultProxy(f"http://127.0.0.1:{port}", classify=request_kind).start()
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        s3 = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
        s3.create_bucket(Bucket="scale")
        if args.files:
            for part in sorted((tmp / "day").iterdir()):
                s3.upload_file(str(part), "scale", f"day/{part.name}")
            config["input"]["uri"] = "s3://scale/day/part-*.jsonl.gz"
        else:
            s3.upload_file(str(tmp / "input.jsonl"), "scale", "input.jsonl")
            config["input"]["uri"] = "s3://scale/input.jsonl"
        config["storage"] = {"uri": "s3://scale/state", "endpoint_url": proxy.url, "region": "us-east-1"}
        proxy.reset_counters()
    else:
        config["storage"] = {"uri": str(tmp / "state")}
    import yaml

    (tmp / "job.yaml").write_text(yaml.safe_dump(config))
    job_dir = tmp / "state" / "jobs" / job_id
    out: dict[str, Any] = {"items": args.items, "batch_size": args.batch_size}
    try:
        watcher = Watcher(job_dir / "job.json")
        if not args.s3:
            watcher.start()
        t0 = time.perf_counter()
        if args.kill_at is None:
            proc = cli("submit", str(tmp / "job.yaml"), "--wait", env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
            err = proc.communicate()[1]
            assert proc.returncode == 0, err[-3000:]
        else:
            assert not args.s3, "--kill-at works on the local store"
            assert cli("submit", str(tmp / "job.yaml"), env=env, stdout=subprocess.DEVNULL).wait() == 0
            total = args.items // args.batch_size
            while commits(job_dir / "tasks") < total * args.kill_at:
                time.sleep(0.5)
            pid = json.loads((job_dir / "job.json").read_text())["coordinator_pid"]
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            killed_at = time.perf_counter()
            time.sleep(2)  # nothing of the killed run is left to commit: its workers were in its process group
            at_kill = commits(job_dir / "tasks")
            t_resume = time.perf_counter()
            proc = cli("resume", job_id, "--wait", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
            first_new = None
            while proc.poll() is None:
                if first_new is None and commits(job_dir / "tasks") > at_kill:
                    first_new = time.perf_counter() - t_resume
                time.sleep(0.05)
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            log = (Path(env.get("SLURMCTL_HOME", Path.home() / ".slurmctl")) / "logs" / f"{job_id}.log").read_text()
            resumed = [line for line in log.splitlines() if "batches in" in line and "shards" in line][-1:]
            out.update(killed_after_s=round(killed_at - t0, 1), batches_committed_at_kill=at_kill,
                       resume_first_commit_s=round(first_new, 2) if first_new else None,
                       resumed_plan=resumed[0].split(" - ")[-1] if resumed else None)
        seconds = time.perf_counter() - t0
        watcher.stop.set()
        store_job = json.loads((job_dir / "job.json").read_text()) if not args.s3 else None
        if args.s3:
            import boto3

            s3 = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
            requests = proxy.stats()["requests"]
            store_job = json.loads(s3.get_object(Bucket="scale", Key=f"state/jobs/{job_id}/job.json")["Body"].read())
            s3.download_file("scale", f"state/jobs/{job_id}/output/data.parquet", str(tmp / "data.parquet"))
            output = str(tmp / "data.parquet")
        else:
            requests = None
            output = store_job["output"][len("file://"):]
        batches = store_job["counts"]["batches_total"]
        check_output(output, args.items)
        checks = prefect_checks(api, store_job, batches)
        assert checks["task_runs"] <= 2000, checks
        assert set(checks["task_run_states"]) <= {"Completed", "Cached"}, checks
        if baseline_s is not None:
            out.update(baseline_s=round(baseline_s, 1), baseline_rows_per_s=round(args.items / baseline_s),
                       ratio=round(baseline_s / seconds, 3))
        out.update(batches=batches, task_runs=checks["task_runs"], seconds=round(seconds, 1),
                   items_per_s=round(args.items / seconds), files=args.files,
                   coordinator_peak_rss_mb=round(watcher.peak) if not args.s3 else None,
                   store_requests_per_batch=round(requests / batches, 3) if requests is not None else None,
                   task_run_states=checks["task_run_states"], ui=checks["ui"], flow_runs=checks["flow_runs"])
        if proxy is not None:
            out["store_requests"] = requests
            out["store_requests_by_kind"] = dict(proxy.classified.most_common())
    finally:
        if proxy is not None:
            proxy.stop()
        if moto is not None:
            stop(moto)
        subprocess.run(["rm", "-rf", str(tmp)])
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
