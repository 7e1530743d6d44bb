"""Running real jobs from tests as a user would, and reading what they left behind.

``run_cli`` runs the real ``slurmctl`` command in a subprocess; the other helpers read a job's state the way an
operator can: ``slurmctl status --json``, the coordinator's log, the manifests in the store, the output dataset.

    cfg = write_config(tmp_path / "job.yaml", job_id="j", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "in.jsonl"}, storage={"uri": "state"})
    assert run_cli("submit", str(cfg), "--wait").returncode == 0
    assert sorted(output_ids(status("j"))) == [...]
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

T = TypeVar("T")


# ---- the command line ------------------------------------------------------------------------------------------

def run_cli(*args: str, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the real ``slurmctl`` command as a user would (a subprocess, environment inherited)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # tests/ on the path: jobs may use the handlers in tests/support (workers inherit it)
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "slurmctl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# A `slurmctl` command whose imports are done before it is told to run (one line on stdin): what the command does,
# exactly, only without its start-up in the middle of what a test times.
_READY = """
import sys
import slurmctl.blocks.manifest_store, slurmctl.blocks.rate_limiter, slurmctl.books.limits, slurmctl.books.store, slurmctl.control.limits, slurmctl.cli.root
from slurmctl.cli.root import main
if sys.stdin.readline().strip() == "go":
    sys.exit(main(sys.argv[1:]))
sys.exit(3)
"""


class ReadyCommand:
    """``slurmctl ARGS`` started ahead and held once imported; ``run()`` lets it go and waits for it. For a test
    that must act at a moment (pause a job at its 40th request): a fresh ``slurmctl`` takes seconds to import, and
    the job does not wait meanwhile."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-c", _READY, *args], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, timeout: float = 600) -> subprocess.CompletedProcess:
        out, err = self.proc.communicate("go\n", timeout=timeout)
        return subprocess.CompletedProcess(["slurmctl", *self.args], self.proc.returncode, out, err)

    def __enter__(self) -> "ReadyCommand":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:  # never told to run: it does nothing
            self.proc.communicate("", timeout=60)


def write_jsonl(path: Path, records: Iterable[Any]) -> Path:
    """One JSON value per line; strings are written as they are (to make malformed lines)."""
    with path.open("w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_config(path: Path, **cfg: Any) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def status(job_id: str, *extra: str) -> dict[str, Any]:
    """What ``slurmctl status JOB --json`` prints. With extra arguments (``--scan``, ``--storage``) the command runs;
    without, the view is computed in this process by the function the command prints (``current_status``): a
    ``slurmctl`` process costs seconds of CPU, which on a 2-core machine a running job under test needs too.
    tests/test_embedded.py holds that the two agree."""
    if not extra:
        return current_status(job_id)
    return cli_status(job_id, *extra)


def cli_status(job_id: str, *extra: str) -> dict[str, Any]:
    """``slurmctl status JOB --json`` run as a command (extra arguments passed on)."""
    result = run_cli("status", job_id, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def current_status(job_id: str) -> dict[str, Any]:
    """The view ``slurmctl status JOB --json`` prints, computed in this process from the job's manifests (the same
    function, the same store lookup)."""
    import contextlib

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from slurmctl.books.status import job_status
    from slurmctl.books.store import load_job, store_for
    from slurmctl.config import known_storage

    # the Prefect API the command would see: this process's environment now, not its settings at import (a store
    # saved as a block is loaded from it)
    api = os.environ.get("PREFECT_API_URL")
    with temporary_settings(updates={PREFECT_API_URL: api}) if api else contextlib.nullcontext():
        store = store_for(known_storage(job_id))
        return job_status(store, load_job(store, job_id))


def log_tail(home: Path, job_id: str, chars: int = 6000) -> str:
    """The end of the coordinator's log (``$SLURMCTL_HOME/logs/<job_id>.log``), for assertion messages."""
    path = home / "logs" / f"{job_id}.log"
    return path.read_text()[-chars:] if path.exists() else ""


def why(home: Path, job_id: str, store: Path | None = None) -> str:
    """For an assertion message when a job did not do what a test expected: the coordinator log's warnings and
    errors (worker losses, failed batches), and the error of each failed batch (a local ``store``)."""
    lines = [line for line in log_text(home, job_id).splitlines() if "| WARNING |" in line or "| ERROR" in line]
    out = ["coordinator log, warnings and errors:", *lines[-60:]]
    if store is not None:
        for path in sorted((store / "jobs" / job_id / "tasks").glob("*.failed.json")):
            out.append(f"{path.name}: {json.loads(path.read_text()).get('error')}")
    return "\n".join(out) + "\n" + log_tail(home, job_id, 3000)


def log_text(home: Path, job_id: str) -> str:
    path = home / "logs" / f"{job_id}.log"
    return path.read_text() if path.exists() else ""


# ---- waiting ---------------------------------------------------------------------------------------------------

def held_job(tmp_path: Path, job_id: str, n: int, **extra) -> tuple[Path, Path, Path]:
    """A job of ``n`` items in batches of 10 on one local worker, whose item 25 holds (in the third batch) until
    ``release`` exists; ``marker`` appears when it starts holding."""
    marker, release = tmp_path / "held", tmp_path / "release"
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    cfg = write_config(tmp_path / "job.yaml", job_id=job_id, handler="support.sample_handlers:counting",
                       input={"uri": "in.jsonl"}, batch_size=10, storage={"uri": "state"}, batch_retries=0,
                       params={"calls_file": str(tmp_path / "calls"),
                               "hold": {"id": 25, "marker": str(marker), "release": str(release)}},
                       cluster={"kind": "local", "n_workers": 1}, **extra)
    return cfg, marker, release


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_until_ended(job_id: str, timeout: float = 300) -> dict[str, Any]:
    """Wait for a job started without ``--wait`` to end; its final status view."""
    return wait_for(lambda: (v := current_status(job_id))["status"] in ("completed", "failed") and v, timeout,
                    f"job {job_id} to end", interval=0.5)


# ---- manifests (a local store: ``storage: {uri: <dir>}``) ------------------------------------------------------

def job_manifest(store: Path, job_id: str) -> dict[str, Any]:
    return json.loads((store / "jobs" / job_id / "job.json").read_text())


def committed_tasks(store: Path, job_id: str, prefix: str = "batch-") -> dict[str, dict[str, Any]]:
    """Committed task manifests by batch id (``prefix`` ``batch-`` for the first pass, ``r01-batch-`` for round 1,
    ``""`` for all); failure records (``*.failed.json``) are not commits."""
    tasks = {}
    for path in sorted((store / "jobs" / job_id / "tasks").glob(f"{prefix}*.json")):
        if not path.name.endswith(".failed.json"):
            tasks[path.name[:-len(".json")]] = json.loads(path.read_text())
    return tasks


# ---- output ----------------------------------------------------------------------------------------------------

def output_ids(view: dict[str, Any], endpoint_url: str | None = None, column: str = "id") -> list[Any]:
    """The id column of a completed job's output dataset (``file://`` or ``s3://`` through ``endpoint_url``)."""
    import pyarrow.parquet as pq

    uri = view["output"]
    assert uri, f"job {view['job_id']} has no output: {view}"
    if uri.startswith("s3://"):
        import boto3

        bucket, _, key = uri[5:].partition("/")
        body = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").get_object(
            Bucket=bucket, Key=key)["Body"].read()
        return pq.read_table(io.BytesIO(body)).column(column).to_pylist()
    return pq.read_table(uri[len("file://"):]).column(column).to_pylist()


def assert_exactly_once(view: dict[str, Any], expected: Iterable[Any], endpoint_url: str | None = None) -> None:
    """The output holds every expected id once: no duplicates, nothing missing, nothing extra."""
    ids = output_ids(view, endpoint_url)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate rows in the output"
    expected = set(expected)
    assert set(ids) == expected, (f"missing {sorted(expected - set(ids))[:20]}, "
                                  f"unexpected {sorted(set(ids) - expected)[:20]}")
