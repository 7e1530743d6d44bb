"""Shared fixtures: real servers (Prefect, moto, a small HTTP API) on 127.0.0.1, the real Slurm, and the backends
(local, or AWS on the moto server) that tests run against. Helpers that are not fixtures live in ``tests/support``.

Servers are started once per session by the fixtures themselves and stopped at the end, so `pytest` needs nothing
running beforehand. Slurm is started by ``scripts/slurm.sh`` (``scripts/test.sh`` does it); when it is not running
the Slurm tests skip, except under ``SLURMCTL_REQUIRE_SLURM=1`` (CI), where they fail instead.

Every test that talks to a server process carries the ``integration`` mark, so ``pytest -m "not integration"`` starts
none: tests using a server fixture are marked at collection, backends chosen at run time (``getfixturevalue``) are
marked on their parameter, and a server fixture fails any test that reaches it unmarked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from support.servers import BIN, free_port, moto_command, stop, wait_http  # noqa: F401 (idem)

# A job's coordinator leaves no spare for the next job (slurmctl.control.spare) unless a test asks for one: each would
# import everything in the background while the next tests run.
os.environ["SLURMCTL_SPARE_COORDINATOR"] = "0"

# Fixtures that start (or need) a server process; a test using any of them is an integration test.
SERVER_FIXTURES = frozenset({"prefect_api", "moto_endpoint", "s3_bucket", "slurm"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marks added here count
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def require_integration(request: pytest.FixtureRequest, what: str) -> None:
    """Refuse to start a server for a test not marked ``integration`` (a backend picked at run time, unmarked)."""
    if request.node.get_closest_marker("integration") is None:
        pytest.fail(f"{request.node.nodeid} uses {what} but is not marked integration: mark it (for a backend "
                    f"parameter: pytest.param(..., marks=pytest.mark.integration)) so `-m 'not integration'` "
                    f"starts no server", pytrace=False)


# ---- servers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def _prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("SLURMCTL_TEST_PREFECT_API_URL"):
        url = os.environ["SLURMCTL_TEST_PREFECT_API_URL"]
        os.environ["PREFECT_API_URL"] = url
        yield url
        return
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    log = home / "server.log"
    # The UI is on (the browser test reads it; it adds nothing measurable to the ~11 s start), told where the API
    # is: on a port other than 4200 it would call 4200 and show "Can't connect to Server API".
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_API_URL": ""}
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


@pytest.fixture
def prefect_api(request: pytest.FixtureRequest) -> str:
    """A real ``prefect server`` (the ephemeral one drops task runs), exported as PREFECT_API_URL; one per session."""
    require_integration(request, "a Prefect server")
    return request.getfixturevalue("_prefect_server")


@pytest.fixture
def prefect_ui(prefect_api: str) -> str:
    """The Prefect UI of the test server (``http://127.0.0.1:<port>``, pages such as ``/runs/flow-run/<id>``). A
    server serving no UI skips the test, loudly, or fails it under ``SLURMCTL_REQUIRE_BROWSER=1`` (CI), as the
    ``chromium`` fixture does: there a browser test that did not run is a failure."""
    import urllib.request

    base = prefect_api.removesuffix("/api")
    try:
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode(errors="replace")
    except Exception as e:  # noqa: BLE001 (any failure means the same: no UI there)
        page = repr(e)
    if "<html" not in page:
        msg = (f"BROWSER TEST NOT RUN: the Prefect server at {prefect_api} serves no UI at {base}/ "
               f"(SLURMCTL_TEST_PREFECT_API_URL names a server started with PREFECT_UI_ENABLED=false?): {page[:200]}")
        if os.environ.get("SLURMCTL_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + "; SLURMCTL_REQUIRE_BROWSER=1 requires it", pytrace=False)
        pytest.skip(msg)
    return base


@pytest.fixture
def chromium(tmp_path: Path) -> Any:
    """Headless Chromium (``tests/support/browser.py``) working under the test's ``tmp_path``. Missing, the test is
    skipped, loudly, or fails under ``SLURMCTL_REQUIRE_BROWSER=1`` (CI, and scripts/test.sh once it installed it)."""
    from support.browser import Chromium, find_chromium

    path = find_chromium()
    if path is None:
        msg = ("BROWSER TEST NOT RUN: Chromium is not installed. `bash scripts/browser.sh up` installs it (as root "
               "or with passwordless sudo; scripts/test.sh runs it)")
        if os.environ.get("SLURMCTL_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + "; SLURMCTL_REQUIRE_BROWSER=1 requires it", pytrace=False)
        pytest.skip(msg)
    return Chromium(path, tmp_path / "chromium")


@pytest.fixture(scope="session")
def _moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(moto_command(port),
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
def moto_endpoint(request: pytest.FixtureRequest) -> str:
    """A moto server on 127.0.0.1 (one per session): real boto3 over HTTP. Credentials are dummies exported for
    subprocesses."""
    require_integration(request, "the moto server")
    return request.getfixturevalue("_moto_server")


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


@pytest.fixture
def slurm(request: pytest.FixtureRequest) -> None:
    require_integration(request, "Slurm")
    if slurm_usable():
        return
    msg = "Slurm is not running: start it with `bash scripts/slurm.sh up` (scripts/test.sh does)"
    if os.environ.get("SLURMCTL_REQUIRE_SLURM") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def item_api() -> Iterator[tuple[str, Any]]:
    """A small local JSON API (a fault-free ChaosApi, in this process): ``GET /items/<id>`` answers
    ``{"id": id, "value": id * 2}``; 404 for ids < 0; ``api.requests`` counts requests."""
    from support.chaos_api import ChaosApi

    with ChaosApi() as api:
        yield api.url, api


@pytest.fixture
def slurmctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ``SLURMCTL_HOME``. A job run without ``PREFECT_API_URL`` starts the local Prefect server there
    (``slurmctl.prefect_server``): it is stopped when the test ends, so no server outlives its test."""
    home = tmp_path / "slurmctl-home"
    monkeypatch.setenv("SLURMCTL_HOME", str(home))
    yield home
    from slurmctl.control import spare

    spare.stop_all()
    if (home / "server.json").exists():
        from slurmctl import prefect_server

        prefect_server.stop()


# ---- backends: each test runs against the local one and, as an integration test, the AWS one on moto ----------

LOCAL = "local"
ON_MOTO = pytest.mark.integration


@pytest.fixture(params=[LOCAL, pytest.param("s3", marks=ON_MOTO)])
def manifest_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A manifest store: a local directory, or a prefix of a fresh bucket on the moto server."""
    from slurmctl.blocks.manifest_store import LocalManifestStore, store_from_uri

    if request.param == LOCAL:
        return LocalManifestStore(root=str(tmp_path / "store"))
    endpoint, bucket = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")
    return store_from_uri(f"s3://{bucket}/some/prefix", endpoint_url=endpoint, region="us-east-1")


@pytest.fixture(params=[LOCAL, pytest.param("dynamodb", marks=ON_MOTO)])
def limiter_args(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """``limiter_from_config`` arguments: SQLite, or a fresh DynamoDB table on moto with signals (new epochs: pause,
    rate, throttling) in an S3 object, as in a job with S3 storage."""
    if request.param == LOCAL:
        return {"kind": "local", "path": str(tmp_path / "limits.sqlite")}
    from slurmctl.blocks.manifest_store import store_from_uri
    from slurmctl.blocks.rate_limiter import DynamoDBRateLimiter, limiter_from_config

    endpoint, bucket = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")
    signals = store_from_uri(f"s3://{bucket}/job", endpoint_url=endpoint, region="us-east-1")
    args = {"kind": "dynamodb", "table": f"limits-{os.urandom(3).hex()}", "endpoint_url": endpoint,
            "region": "us-east-1", "signals": signals}
    limiter = limiter_from_config(**args)
    assert isinstance(limiter, DynamoDBRateLimiter)
    limiter.ensure_table()
    return args


@pytest.fixture(params=[LOCAL, pytest.param("dynamodb", marks=ON_MOTO)])
def job_backends(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Job config fields for where a job keeps its limits and manifests: ``{}`` (SQLite + local files, the
    defaults), or DynamoDB + S3 on the moto server."""
    if request.param == LOCAL:
        return {}
    endpoint, bucket = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")
    return {"storage": {"uri": f"s3://{bucket}/runs", "endpoint_url": endpoint, "region": "us-east-1"},
            "rate_limiter": {"kind": "dynamodb", "table": f"limits-{bucket}", "endpoint_url": endpoint,
                             "region": "us-east-1"}}
