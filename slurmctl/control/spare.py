"""A spare coordinator: the next job's coordinator, started when a job on this machine ends, already past its imports.

A coordinator's first ~1.7 s (of a one-record job's ~4.5 s) are a fresh Python importing Prefect, Dask, pyarrow and
the blocks, and its workers' template doing the same; the bare stack pays that once per process. So a local
coordinator, once its job is over, starts a spare: ``python -m slurmctl.cli.coordinator --spare``, with the
environment and working directory it was itself given (what ``slurmctl submit`` hands a coordinator), which imports
everything, starts its workers' template (local jobs), and waits on a Unix socket under ``$SLURMCTL_HOME/spares/``.

The next ``submit`` or ``resume`` that would start a coordinator with that same environment, working directory,
Python and cluster kind (``fingerprint``) claims it instead (``claim``: the socket renamed away first, so two
commands never claim one spare) and sends it the job: the spare writes its output to the job's log from then on and
runs the job as any coordinator does. Anything that differs, a spare still importing, or one that does not answer:
a coordinator is started as before. A spare nobody claims exits after ``SLURMCTL_SPARE_IDLE_S`` (600 s), and
``slurmctl server stop`` ends it. ``SLURMCTL_SPARE_COORDINATOR=0`` turns spares off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slurmctl.paths import home

ENABLE_ENV = "SLURMCTL_SPARE_COORDINATOR"
IDLE_ENV = "SLURMCTL_SPARE_IDLE_S"
IDLE_S = 600.0
CLAIM_TIMEOUT_S = 5.0
CHECK_EVERY_S = 2.0  # how often a waiting spare checks that it is still listed


def enabled(env: dict[str, str] | None = None) -> bool:
    return (env if env is not None else os.environ).get(ENABLE_ENV, "1") != "0"


def spares_dir() -> Path:
    return home() / "spares"


def fingerprint(env: dict[str, str], cwd: str, fork_workers: bool) -> str:
    """What a coordinator inherits and cannot change once its imports ran: its Python, working directory,
    environment (every variable: a handler may read any), whether its workers fork from a template, and slurmctl's
    own code (an upgrade, or an edit of a checkout, since the spare imported it)."""
    body = json.dumps([sys.executable, os.path.realpath(cwd), sorted(env.items()), fork_workers, _code_stamp()])
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def _code_stamp() -> list[int]:
    """slurmctl's modules (its subpackages may live apart: a checkout's flows/, tasks/, ...): how many, and the
    newest modification time (~2 ms for ~150 files)."""
    import importlib.util

    roots = {Path(__file__).resolve().parents[1]}
    for sub in ("flows", "tasks", "blocks", "handlers"):
        spec = importlib.util.find_spec(f"slurmctl.{sub}")  # where it is, without importing it
        roots.update(Path(p).resolve() for p in (spec.submodule_search_locations or []) if spec)
    files = {p for root in roots for p in root.rglob("*.py")}
    times = [p.stat().st_mtime_ns for p in files]
    return [len(times), max(times, default=0)]


def _pid(marker: Path) -> int | None:
    """The spare's pid a marker names (``<fingerprint>.<pid>.<state>``)."""
    try:
        return int(marker.name.split(".")[1])
    except (ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Is process ``pid`` running (not gone, not a zombie nobody reaped yet; Linux says which in /proc)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's (a shared $SLURMCTL_HOME): alive, and not ours
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _listed(pattern: str) -> list[Path]:
    """The markers matching ``pattern`` whose process lives; one whose process is gone (killed outright) is
    removed."""
    found = []
    for path in sorted(spares_dir().glob(pattern)) if spares_dir().is_dir() else []:
        pid = _pid(path)
        if pid is not None and _alive(pid):
            found.append(path)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


def _ready(fp: str) -> list[Path]:
    """The markers of the spares waiting (``<fingerprint>.<pid>.ready``, holding their socket's path)."""
    return _listed(f"{fp}.*.ready")


def _socket_path(fp: str) -> Path:
    """Where the spare listens: a short path (a Unix socket's is limited to ~104 bytes; $SLURMCTL_HOME may be deep)."""
    directory = Path(tempfile.gettempdir()) / f"slurmctl-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:  # someone else's, or others may connect: no spare here
        raise PermissionError(f"{directory} is not private to this user")
    return directory / f"{fp}.{os.getpid()}.sock"


def available(fp: str) -> bool:
    """Is a spare of this fingerprint waiting (cheap: a directory listing)?"""
    return bool(_ready(fp))


def waiting() -> list[int]:
    """The pids of the spares waiting for a job (``slurmctl server status``)."""
    return [pid for path in _ready("*") if (pid := _pid(path)) is not None]


def _starting(fp: str) -> bool:
    """Is a spare of this fingerprint still importing (its ``.starting`` marker, its process alive)?"""
    return bool(_listed(f"{fp}.*.starting"))


class Adopted:
    """A claimed spare as ``slurmctl submit --wait`` watches a coordinator it started (``poll``, ``wait``, ``pid``);
    not our child, so its exit code is unknown (``returncode`` stays None; the job manifest says how it ended)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        return None if _alive(self.pid) else 0

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while _alive(self.pid):
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"coordinator {self.pid}", timeout)
            time.sleep(0.05)
        return 0


def claim(fp: str, request: dict[str, Any]) -> Adopted | None:
    """Hand ``request`` (the job: the coordinator's arguments and its log) to a waiting spare of fingerprint ``fp``;
    the spare as a watched process, or None (none waiting, or none answered: start a coordinator as before)."""
    for path in _ready(fp):
        taken = path.with_suffix(".claimed")
        try:
            os.rename(path, taken)  # atomic: only one command gets it
            address = taken.read_text()
        except OSError:
            continue
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(CLAIM_TIMEOUT_S)
                conn.connect(address)
                conn.sendall(json.dumps(request).encode() + b"\n")
                answer = conn.makefile("rb").readline().decode().split()
                if len(answer) == 2 and answer[0] == "ok":
                    conn.sendall(b"go\n")  # only now does it run the job: never both it and a coordinator of ours
                    return Adopted(int(answer[1]))
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                taken.unlink()
    return None


def serve(fp: str) -> dict[str, Any] | None:
    """In the spare: wait for a job; return its request, or None once idle for ``SLURMCTL_SPARE_IDLE_S``."""
    directory = spares_dir()
    marker = directory / f"{fp}.{os.getpid()}.ready"
    if not marker.with_suffix(".starting").exists():  # stopped while it imported (``stop_all``), or not started
        return None  # by ``start_spare``
    try:
        address = _socket_path(fp)
    except OSError as exc:
        print(f"spare {os.getpid()}: {exc}", file=sys.stderr)
        return None
    with contextlib.suppress(OSError):
        address.unlink()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(address))
            server.listen(1)
            server.settimeout(CHECK_EVERY_S)
            writing = marker.with_suffix(".writing")
            writing.write_text(str(address))
            os.rename(writing, marker)  # ready: only now can a command find it
            with contextlib.suppress(OSError):
                marker.with_suffix(".starting").unlink()
            idle_until = time.monotonic() + float(os.environ.get(IDLE_ENV, IDLE_S))
            while True:
                try:
                    conn, _ = server.accept()
                    break
                except socket.timeout:
                    pass
                # Gone without a claim (``stop_all``, or its $SLURMCTL_HOME removed): nobody can hand it a job
                if time.monotonic() > idle_until or not (marker.exists() or marker.with_suffix(".claimed").exists()):
                    return None
            with conn:
                try:
                    conn.settimeout(CLAIM_TIMEOUT_S)
                    lines = conn.makefile("rb")
                    request = json.loads(lines.readline())
                    conn.sendall(f"ok {os.getpid()}\n".encode())
                    conn.settimeout(2 * CLAIM_TIMEOUT_S)
                    # The command that claimed us may have given up waiting (it then starts a coordinator itself):
                    # the job is ours only once it says go
                    return request if lines.readline().strip() == b"go" else None
                except (OSError, ValueError):  # it went away mid-claim: exit, as an idle spare does
                    return None
    finally:
        for p in (address, marker, marker.with_suffix(".claimed"), marker.with_suffix(".starting")):
            with contextlib.suppress(OSError):
                p.unlink()


def start_spare(env: dict[str, str], fork_workers: bool) -> None:
    """Start a spare for the next job with ``env`` (this coordinator's environment as it was given), unless spares
    are off or one of that fingerprint is already waiting. Returns at once."""
    fp = fingerprint(env, os.getcwd(), fork_workers)
    if not enabled(env) or available(fp) or _starting(fp):
        return
    directory = spares_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "spares.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "slurmctl.cli.coordinator", "--spare",
                                 *(["--fork-workers"] if fork_workers else [])],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    (directory / f"{fp}.{proc.pid}.starting").touch()


def stop_all() -> int:
    """End every spare of this ``$SLURMCTL_HOME``, waiting or still importing (``slurmctl server stop``); how
    many."""
    stopped = 0
    for path in [*_ready("*"), *_listed("*.*.starting")]:
        taken, pid = path.with_suffix(".claimed"), _pid(path)
        try:
            os.rename(path, taken)  # claimed by nobody: no command hands it a job now
        except OSError:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # its session: the workers' template too
            stopped += 1
        with contextlib.suppress(OSError):
            taken.unlink()
    return stopped
