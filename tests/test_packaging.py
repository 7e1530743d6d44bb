"""One installable package: everything we ship imports as ``slurmctl.*``, and a user's own ``handlers`` is theirs.

The repository keeps the design card's folders (``flows/ tasks/ blocks/ handlers/ deployments/``); pyproject maps them
to subpackages of ``slurmctl``. These tests check that from outside the repository (a neutral directory, a wheel in
a fresh virtual environment), where nothing can work by the accident of the current directory being on ``sys.path``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.jobs import ROOT, log_text, run_cli, write_config, write_jsonl
from support.prefect_runs import registered_block_types

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.manifests import JOB_SCHEMA_VERSION, Keys
from slurmctl.books.store import JobTooNew, load_job, new_job_manifest
from slurmctl.config import parse_config
from slurmctl.handler import HandlerError, load_handler

OURS = ("flows", "tasks", "blocks", "handlers", "deployments")
SOURCES = ("slurmctl", *OURS, "tests", "benchmarks", "examples", "scripts")


def python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment, from ``cwd`` (PYTHONPATH cleared)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_every_import_of_our_code_names_the_slurmctl_package():
    """Two names for one module (``flows.job`` and ``slurmctl.flows.job``) are two block classes, two tasks: Prefect
    and Dask pickling break. So no file may import a design-card folder by its bare name."""
    offenders = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in OURS]
    assert offenders == []


def test_from_a_neutral_directory_only_slurmctl_is_ours(tmp_path: Path):
    import yaml

    entrypoints = [d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]]
    result = python(f"""
        entrypoints = {entrypoints!r}""" + """
        import importlib, json
        bare = {}
        for name in ("flows", "tasks", "blocks", "handlers", "deployments"):
            try:
                importlib.import_module(name)
                bare[name] = "imported"
            except ModuleNotFoundError as exc:
                bare[name] = exc.name
        from slurmctl.errors import ItemError            # the public imports the README documents
        from slurmctl.handler import BatchContext
        import slurmctl.blocks, slurmctl.flows.job, slurmctl.handlers.echo
        from prefect.flows import load_flow_from_entrypoint
        # a deployment's flow is the installed one, not a second module loaded from a file
        same = [load_flow_from_entrypoint(e).fn is slurmctl.flows.job.run_job.fn for e in entrypoints]
        print(json.dumps({"bare": bare, "deployments": same, "blocks": sorted(slurmctl.blocks.__all__),
                          "flow": slurmctl.flows.job.run_job.name,
                          "echo": slurmctl.handlers.echo.handle({"id": 1}, BatchContext(job_id="t", batch_id="b")),
                          "item_error": ItemError("x", error_class="quota").error_class}))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["bare"] == {name: name for name in OURS}
    assert seen["deployments"] == [True] * len(entrypoints) and entrypoints
    assert seen["blocks"] == ["DynamoDBRateLimiter", "LocalManifestStore", "LocalRateLimiter", "S3ManifestStore"]
    assert seen["flow"] == "slurmctl-job" and seen["echo"] == {"id": 1} and seen["item_error"] == "quota"


@pytest.mark.parametrize("where", ["a neutral directory", "the repository"])
def test_a_new_config_naming_an_old_handler_module_is_told_the_new_name(tmp_path: Path, where: str):
    """In the repository ``handlers.echo`` would even import (our folder is on the path): it is still ours, renamed."""
    cwd = tmp_path if where == "a neutral directory" else ROOT
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1}])
    cfg = write_config(tmp_path / "job.yaml", job_id="old-name", handler="handlers.echo:handle",
                       input={"uri": str(tmp_path / "in.jsonl")}, storage={"uri": str(tmp_path / "state")})
    result = run_cli("submit", str(cfg), cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert "handler" in result.stderr and "slurmctl.handlers.echo:handle" in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was written


def test_a_users_own_handlers_package_is_theirs_even_with_our_module_names(tmp_path: Path):
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "__init__.py").write_text("")
    (tmp_path / "handlers" / "echo.py").write_text("def handle(item, ctx):\n    return {'mine': True}\n")
    (tmp_path / "handlers" / "geocode.py").write_text("def handle(item, ctx):\n    return {'city': 'Berlin'}\n")
    result = python("""
        from slurmctl.handler import load_handler
        print(load_handler("handlers.echo:handle")({}, None), load_handler("handlers.geocode:handle")({}, None))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "{'mine': True} {'city': 'Berlin'}"


def test_the_new_names_load_and_the_old_ones_do_not():
    from slurmctl.handlers import echo

    assert load_handler("slurmctl.handlers.echo:handle") is echo.handle
    with pytest.raises(HandlerError, match="write handler: slurmctl.handlers.http_json:handle"):
        load_handler("handlers.http_json:handle")


def _v1_job(store: LocalManifestStore, job_id: str) -> None:
    """A job manifest as slurmctl 0.1 wrote it: schema 1, our handler by its top-level module name."""
    cfg = parse_config({"job_id": job_id, "handler": "slurmctl.handlers.echo:handle",
                        "input": {"uri": "in.jsonl"}, "storage": {"uri": store.root}})
    body = new_job_manifest(cfg, None).model_dump(mode="json")
    body |= {"schema_version": 1, "handler": "handlers.echo:handle", "handler_version": "handlers.echo:handle@sha256:0"}
    body["config"]["handler"] = "handlers.echo:handle"
    store.put_json(Keys(job_id).job, body)


def test_a_job_manifest_from_0_1_is_read_with_the_new_handler_name(tmp_path: Path):
    store = LocalManifestStore(root=str(tmp_path / "state"))
    _v1_job(store, "old")
    job = load_job(store, "old")
    assert (job.schema_version, job.handler, job.config["handler"]) == (
        JOB_SCHEMA_VERSION, "slurmctl.handlers.echo:handle", "slurmctl.handlers.echo:handle")
    assert job.handler_version == "handlers.echo:handle@sha256:0"  # the batches' cache keys do not move


def test_a_job_manifest_from_a_newer_release_is_refused_with_what_to_do(tmp_path: Path):
    store = LocalManifestStore(root=str(tmp_path / "state"))
    cfg = parse_config({"job_id": "new", "handler": "slurmctl.handlers.echo:handle", "input": {"uri": "in.jsonl"}})
    store.put_json(Keys("new").job, new_job_manifest(cfg, None).model_dump(mode="json") | {"schema_version": 99})
    with pytest.raises(JobTooNew, match="schema 99.*upgrade slurmctl"):
        load_job(store, "new")
    for command in ("status", "resume"):
        result = run_cli(command, "new", "--storage", str(tmp_path / "state"), cwd=tmp_path)
        assert result.returncode == 2 and "upgrade slurmctl" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_a_job_submitted_by_0_1_is_resumed_and_completes(tmp_path: Path, prefect_api: str, slurmctl_home: Path):
    """Its coordinator died before partitioning; the manifest names ``handlers.echo``, which no longer imports."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(1, 31)])
    store = LocalManifestStore(root=str(tmp_path / "state"))
    cfg = parse_config({"job_id": "from-0-1", "handler": "slurmctl.handlers.echo:handle", "batch_size": 10,
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "storage": {"uri": str(tmp_path / "state")},
                        "cluster": {"kind": "local", "n_workers": 1}})
    body = new_job_manifest(cfg, None).model_dump(mode="json") | {
        "schema_version": 1, "handler": "handlers.echo:handle", "status": "failed", "error": "coordinator lost"}
    body["config"]["handler"] = "handlers.echo:handle"
    store.put_json(Keys("from-0-1").job, body)

    result = run_cli("resume", "from-0-1", "--storage", str(tmp_path / "state"), "--wait", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + log_text(slurmctl_home, "from-0-1")
    job = json.loads((tmp_path / "state" / "jobs" / "from-0-1" / "job.json").read_text())
    assert (job["status"], job["schema_version"], job["handler"]) == (
        "completed", JOB_SCHEMA_VERSION, "slurmctl.handlers.echo:handle")
    rows = pq.read_table(job["output"][len("file://"):]).column("id").to_pylist()
    assert sorted(rows) == list(range(1, 31))


# ---- the wheel -------------------------------------------------------------------------------------------------

def clean_copy(dest: Path) -> Path:
    """The tree as git sees it (tracked and not-ignored files): no build/, egg-info or caches to leak in."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(("tests/", "benchmarks/", "docs/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once per module from a clean copy of the tree (``pip wheel --no-deps``: ~4 s)."""
    where = tmp_path_factory.mktemp("wheel")
    tree = clean_copy(where / "tree")  # a stale build/lib/flows/ in the working tree would land in the wheel
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(where / "dist"), str(tree)], check=True,
                   capture_output=True, timeout=600)
    (built,) = (where / "dist").glob("slurmctl-*.whl")
    return built


# ---- the wheel's imports against its declared requirements ------------------------------------------------------
# `pip check` (below) only checks what the wheel declares: a module importing a package that pyproject does not list
# passes it, here where the test environment has everything installed, and fails on a user's machine. So every
# import in the wheel (module level, inside functions, under try or TYPE_CHECKING, and importlib.import_module of a
# literal name: all are imports the package makes) must name a distribution its declared requirements bring.

# Imported, but only reachable through another declared requirement, and deliberately not declared themselves:
# each comes with (and is pinned by) the one named. Anything else we import must be listed in pyproject.toml.
TRANSITIVE_OK = {
    "botocore": "boto3 (boto3 pins its botocore; we import its exceptions and Config)",
    "numpy": "pandas (arrays under the tables and merges)",
    # distributed measures a worker's memory with psutil; a worker's items in flight are kept within the same limit
    # (slurmctl.inflight.memory_share), and only inside a Dask worker is there a limit to read
    "psutil": "distributed (a Dask worker's own memory reading; ours for its items in flight)",
}


def wheel_imports(wheel: Path) -> dict[str, list[str]]:
    """Top-level names every module in ``wheel`` imports (absolute imports anywhere in the file, and
    ``importlib.import_module`` / ``__import__`` of a string literal) -> where (``file:line``)."""
    found: dict[str, list[str]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not name.endswith(".py"):
                continue
            for node in ast.walk(ast.parse(zf.read(name), name)):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""] if node.level == 0 else []  # relative: the package itself
                elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                      and isinstance(node.args[0].value, str)
                      and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                           or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
                    modules = [node.args[0].value]
                else:
                    continue
                for module in modules:
                    found.setdefault(module.split(".")[0], []).append(f"{name}:{node.lineno}")
    return found


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of the wheel's METADATA."""
    import email.parser

    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []


def requirement_closure(requirements: list[str], extras: frozenset[str] = frozenset()) -> set[str]:
    """The distributions (canonical names) ``requirements`` bring here, transitively, with ``extras`` of the top
    level (markers evaluated for this interpreter, as pip would); the metadata is the test environment's, where
    the pinned versions are installed."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def wanted(req: Requirement, with_extras: frozenset[str]) -> bool:
        if req.marker is None:
            return True
        return any(req.marker.evaluate({"extra": e}) for e in (with_extras or {""}))

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements if wanted(Requirement(r), extras)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen and not req.extras:
            continue
        seen.add(name)
        try:
            sub = md.requires(req.name) or []
        except md.PackageNotFoundError:
            pytest.fail(f"{req.name}, required by the wheel, is not installed in the test environment", pytrace=False)
        todo += [r for r in map(Requirement, sub) if wanted(r, frozenset(req.extras))
                 and (canonicalize_name(r.name) not in seen or r.extras)]
    return seen


def packages_distributions() -> dict[str, list[str]]:
    """``importlib.metadata.packages_distributions()``, also on Python 3.10, whose version reads ``top_level.txt``
    alone (which wheels built by hatchling, meson or poetry lack: prefect, pandas, numpy, pydantic, rich, httpx);
    3.11 and later infer the names from the files a distribution installs, as this does there."""
    import importlib.metadata as md

    if sys.version_info >= (3, 11):
        return md.packages_distributions()
    found: dict[str, list[str]] = {}
    for dist in md.distributions():
        names = (dist.read_text("top_level.txt") or "").split() or {
            f.parts[0] if len(f.parts) > 1 else f.with_suffix("").name for f in dist.files or () if f.suffix == ".py"}
        for name in names:
            found.setdefault(name, []).append(dist.metadata["Name"])
    return found


def test_every_import_in_the_wheel_is_a_declared_requirement(wheel: Path):
    """A module importing a package the wheel does not declare would install and pass `pip check`, then fail on a
    machine without that package; test-only packages (the ``test`` extra: pytest, moto) must never be imported by
    what we ship."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    imports = {name: where for name, where in wheel_imports(wheel).items()
               if name not in sys.stdlib_module_names and name != "slurmctl"}
    assert {"prefect", "yaml", "pyarrow", "boto3"} <= set(imports)  # the scan sees our imports at all
    assert "importlib" not in imports and "__future__" not in imports
    declared = wheel_requirements(wheel)
    runtime = [r for r in declared if not (Requirement(r).marker and "extra" in str(Requirement(r).marker))]
    direct = {canonicalize_name(Requirement(r).name) for r in runtime}
    closure = requirement_closure(runtime)
    test_only = requirement_closure([r for r in declared if r not in runtime], frozenset({"test"})) - closure
    assert {"moto", "pytest"} <= test_only, test_only  # the test extra is read, and is not the runtime's
    providers = packages_distributions()  # import name -> the distributions that install it

    undeclared, test_imports, only_transitive = [], [], []
    for name, where in sorted(imports.items()):
        dists = {canonicalize_name(d) for d in providers.get(name, [])}
        at = ", ".join(where[:3]) + (f" (+{len(where) - 3})" if len(where) > 3 else "")
        if not dists & closure:
            (test_imports if dists & test_only else undeclared).append(
                f"{name} ({'/'.join(sorted(dists)) or 'no installed distribution'}) at {at}")
        elif not dists & direct and name not in TRANSITIVE_OK:
            only_transitive.append(f"{name} ({'/'.join(sorted(dists))}, comes only through another requirement) "
                                   f"at {at}")
    assert test_imports == [], "the wheel imports test-only packages (the `test` extra): " + "; ".join(test_imports)
    assert undeclared == [], ("the wheel imports packages its requirements do not bring (add them to "
                              "[project] dependencies in pyproject.toml): " + "; ".join(undeclared))
    assert only_transitive == [], ("the wheel imports packages it does not declare itself (list them in [project] "
                                   "dependencies, or in TRANSITIVE_OK with why): " + "; ".join(only_transitive))
    assert set(TRANSITIVE_OK) <= set(imports), "TRANSITIVE_OK names a package we no longer import: drop it"


@pytest.mark.integration
def test_the_wheel_holds_one_package_and_runs_a_user_project_with_its_own_handlers(tmp_path: Path, prefect_api: str,
                                                                                    wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert [n for n in names if n.split("/")[0] not in ("slurmctl", dist_info)] == []
    for sub in ("flows/job.py", "tasks/process_batch.py", "blocks/__init__.py", "handlers/echo.py",
                "deployments/__init__.py", "cli/__main__.py", "books/audit.py", "ratelimit/lanes.py"):
        assert f"slurmctl/{sub}" in names

    # A fresh venv gets the wheel alone; its dependencies are the test environment's, on sys.path through a .pth
    # line (a path, not a site dir: that environment's editable install of this tree is not loaded). Installing
    # them from the registry again took ~50 s and tested pip; `pip check` still proves the wheel's requirements met
    # (and test_every_import_in_the_wheel_is_a_declared_requirement that they are all it imports).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    vpy = str(venv / "bin" / "python")
    site = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    Path(site, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([vpy, "-m", "pip", "install", "-q", "--no-compile", "--no-deps",
                              "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([vpy, "-m", "pip", "check", "--disable-pip-version-check"], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:]

    project = tmp_path / "project"  # the README's user project: its own package called handlers
    (project / "handlers").mkdir(parents=True)
    (project / "handlers" / "__init__.py").write_text("")
    (project / "handlers" / "geocode.py").write_text(
        "def handle(item, ctx):\n    return {'id': item['id'], 'city': {'10115': 'Berlin'}[item['zip']]}\n")
    write_jsonl(project / "users.jsonl", [{"id": "u1", "zip": "10115"}])
    write_config(project / "geocode.yaml", job_id="geocode-one", handler="handlers.geocode:handle",
                 input={"uri": "users.jsonl"}, cluster={"kind": "local", "n_workers": 1}, storage={"uri": "state"})
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "SLURMCTL_HOME": str(home / ".slurmctl"),
           "PREFECT_HOME": str(home / ".prefect"), "PREFECT_API_URL": prefect_api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # as in every test (conftest.py): the job leaves no spare coordinator importing while later tests run
           "SLURMCTL_SPARE_COORDINATOR": "0"}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)

    probe = run("python", "-c", "import handlers, slurmctl.handlers, importlib.util as u; "
                                "print(handlers.__file__); print(slurmctl.handlers.__file__); "
                                "print([n for n in ('flows', 'tasks', 'blocks', 'deployments') if u.find_spec(n)])")
    assert probe.returncode == 0, probe.stderr
    users, ours, bare = probe.stdout.splitlines()
    assert users == str(project / "handlers" / "__init__.py") and ours.startswith(str(venv)) and bare == "[]"

    submitted = run("slurmctl", "submit", "geocode.yaml", "--wait")
    job_log = home / ".slurmctl" / "logs" / "geocode-one.log"
    assert submitted.returncode == 0, submitted.stderr + (job_log.read_text() if job_log.exists() else "")
    table = pq.read_table(project / "state" / "jobs" / "geocode-one" / "output" / "data.parquet")
    assert table.to_pylist() == [{"id": "u1", "city": "Berlin"}]

    registered = run("python", "-m", "prefect", "block", "register", "-m", "slurmctl.blocks")
    assert registered.returncode == 0, registered.stderr + registered.stdout
    assert "Successfully registered 4 blocks" in registered.stdout
    ours = ["slurmctl-local-manifest-store", "slurmctl-s3-manifest-store", "slurmctl-local-rate-limiter",
            "slurmctl-dynamodb-rate-limiter"]
    assert registered_block_types(prefect_api, ours) == ours
