"""Shared fixtures: real servers (Prefect, moto, a small HTTP API) on 127.0.0.1, and the real Slurm.

Servers are started once per session by the fixtures themselves and stopped at the end, so `pytest` needs nothing
running beforehand. Slurm is started by ``scripts/slurm.sh`` (``scripts/test.sh`` does it); when it is not running
the Slurm tests skip, except under ``SLURMCTL_REQUIRE_SLURM=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: "
                               f"{log.read_text()[-3000:] if log else ''}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server`` (the ephemeral one drops task runs), exported as PREFECT_API_URL."""
    if os.environ.get("SLURMCTL_TEST_PREFECT_API_URL"):
        url = os.environ["SLURMCTL_TEST_PREFECT_API_URL"]
        os.environ["PREFECT_API_URL"] = url
        yield url
        return
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    log = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(url + "/health", 120, proc, log)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        stop(proc)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server on 127.0.0.1: real boto3 over HTTP. Credentials are dummies exported for subprocesses."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        wait_http(url + "/moto-api/", 60, proc, log)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh bucket on the moto server."""
    import boto3

    name = f"slurmctl-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def slurm_usable() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except (subprocess.SubprocessError, OSError):
        return False
    return any(s.strip().rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in out.split())


@pytest.fixture(scope="session")
def slurm() -> None:
    if slurm_usable():
        return
    msg = "Slurm is not running: start it with `bash scripts/slurm.sh up` (scripts/test.sh does)"
    if os.environ.get("SLURMCTL_REQUIRE_SLURM") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def item_api() -> Iterator[tuple[str, Any]]:
    """A small local JSON API (a fault-free ChaosApi): ``GET /items/<id>`` answers ``{"id": id, "value": id * 2}``;
    404 for ids < 0; ``api.requests`` counts requests."""
    from support.chaos_api import ChaosApi

    with ChaosApi() as api:
        yield api.url, api


@pytest.fixture
def slurmctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "slurmctl-home"
    monkeypatch.setenv("SLURMCTL_HOME", str(home))
    return home


def run_cli(*args: str, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the real ``slurmctl`` command as a user would (a subprocess, environment inherited)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # tests/ on the path: jobs may use the handlers in tests/support (workers inherit it)
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "slurmctl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    with path.open("w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_config(path: Path, **cfg: Any) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
