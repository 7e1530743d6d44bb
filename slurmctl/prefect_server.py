"""The local Prefect server of the embedded default: one ``prefect server start`` per ``$SLURMCTL_HOME``, started on
first use and reused by every later job until ``slurmctl server stop``.

Why a persistent server rather than a temporary one per job:

* **Start cost.** Prefect's temporary server (``SubprocessASGIServer``) took 6-16 s to start on every job, which
  dominated a small job. A server that outlives the job makes the next one start in seconds.
* **A UI for embedded runs.** A temporary server serves no UI and takes its database away with it; this one is a full
  server (UI and background services), so ``http://127.0.0.1:PORT`` shows every job's flow and task runs afterwards.
* **Every task run recorded.** The ephemeral server drops task runs (a 2,000-task flow kept 265 of them,
  /work/shared/ENVIRONMENT.md); a real ``prefect server start`` records them all.

Where things live: ``$SLURMCTL_HOME/server.json`` records the running server (pid, port, URLs, start time, log);
``$SLURMCTL_HOME/prefect`` is its ``PREFECT_HOME`` (the SQLite database and the UI build);
``$SLURMCTL_HOME/logs/prefect-server.log`` is its output. ``$SLURMCTL_HOME/server.lock`` (``fcntl.flock``) makes
starting and stopping one at a time, so two coordinators starting at once start one server.

This module needs only the standard library: the CLI asks whether a server is up without importing Prefect.
An explicit ``PREFECT_API_URL`` always wins over this server; that decision is the caller's (the CLI, the coordinator).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from slurmctl.paths import home
from slurmctl.procs import pid_alive

HOST = "127.0.0.1"
DEFAULT_PORT = 4200  # Prefect's own default: the URL users know
# A fresh database runs its migrations and the UI is copied into PREFECT_HOME on first start: 10-20 s on an idle
# 2-core machine, much more on a loaded one. The wait ends as soon as the server answers (or its process dies).
START_TIMEOUT_S = 120.0
# A recorded server that is alive but does not answer (a busy machine, SQLite under load) gets this long before it is
# taken for hung, stopped and replaced.
UNRESPONSIVE_GRACE_S = 30.0
STOP_TIMEOUT_S = 20.0
HEALTH_TIMEOUT_S = 2.0
# When the port was chosen here (not --port), a server that loses it to another process between our check and its
# bind is started again on another free port, up to this many times.
PORT_ATTEMPTS = 3

# urllib without proxies: an HTTP(S)_PROXY in the environment must not route requests for 127.0.0.1 elsewhere.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Servers this process started, by pid: stop() reaps them (no zombie, no ResourceWarning) when it runs here too.
_children: dict[int, subprocess.Popen] = {}


class ServerError(RuntimeError):
    """The local Prefect server could not be started (the message has the reason and the end of its log)."""


# --- where things are -------------------------------------------------------------------------------------------
def state_file() -> Path:
    return home() / "server.json"


def lock_file() -> Path:
    return home() / "server.lock"


def data_dir() -> Path:
    """The server's ``PREFECT_HOME``: its SQLite database (``prefect.db``) and the UI files it serves."""
    return home() / "prefect"


def log_file() -> Path:
    return home() / "logs" / "prefect-server.log"


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def ui_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def flow_run_url(info: dict[str, Any], flow_run_id: str) -> str:
    """The UI page of one flow run on the server ``info`` describes."""
    return f"{info['ui_url']}/runs/flow-run/{flow_run_id}"


# --- probing ----------------------------------------------------------------------------------------------------
def healthy(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """Does the Prefect API at ``url`` (``http://…/api``) answer its health check?"""
    try:
        with _opener.open(url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _serves_home(url: str, prefect_home: Path) -> bool:
    """Is the server answering at ``url`` the one whose PREFECT_HOME is ``prefect_home`` (and not another server that
    took the port first, e.g. one of another ``SLURMCTL_HOME`` choosing 4200 at the same moment)?"""
    try:
        with _opener.open(url.rstrip("/") + "/admin/settings", timeout=HEALTH_TIMEOUT_S) as resp:
            return Path(json.loads(resp.read())["home"]).resolve() == prefect_home.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_server(pid: int) -> bool:
    """Is ``pid`` a live ``prefect server start`` (and not another process that got a recorded server's pid)?"""
    if not pid_alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # cannot tell: trust the record
    return b"server" in args and b"start" in args


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT after a stop is free
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- the record -------------------------------------------------------------------------------------------------
def server_info() -> dict[str, Any] | None:
    """What ``server.json`` records about the server last started here (it may have died since), or None."""
    try:
        return json.loads(state_file().read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_info(info: dict[str, Any]) -> None:
    path = state_file()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


def running() -> dict[str, Any] | None:
    """The recorded server if its process is alive and its API answers; else None. Cheap (one local HTTP request)."""
    info = server_info()
    if info and _is_server(info["pid"]) and healthy(info["api_url"]):
        return info
    return None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One starter or stopper at a time per ``$SLURMCTL_HOME`` (other processes wait here)."""
    home().mkdir(parents=True, exist_ok=True)
    with open(lock_file(), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- starting ---------------------------------------------------------------------------------------------------
def _prefect_command() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def _server_env(port: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_UI_ENABLED", "PREFECT_SERVER_UI_ENABLED"):
        env.pop(key, None)  # the server is not a client of another API; the UI is on (a user's "off" is for theirs)
    env.update(PREFECT_HOME=str(data_dir()),
               # the UI's pages call the API at this URL: without it they call port 4200 ("Can't connect")
               PREFECT_UI_API_URL=api_url(port),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")  # telemetry fails without network, noisily
    return env


def _log_tail(offset: int, chars: int = 3000) -> str:
    try:
        with log_file().open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


def _launch(port: int, timeout: float) -> dict[str, Any]:
    """Start ``prefect server start`` on ``port``, detached, and wait until its API answers."""
    log = log_file()
    log.parent.mkdir(parents=True, exist_ok=True)
    data_dir().mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        out.write(f"--- slurmctl: starting prefect server on port {port} at {_now()} ---\n".encode())
        out.flush()
        # Its own session: the server outlives the CLI or coordinator that started it, and a Ctrl-C there does
        # not reach it; stop() signals the whole group.
        proc = subprocess.Popen([*_prefect_command(), "server", "start", "--host", HOST, "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=_server_env(port),
                                cwd=home(), start_new_session=True)
    _children[proc.pid] = proc
    url = api_url(port)
    deadline = time.monotonic() + timeout
    while not healthy(url) or not _serves_home(url, data_dir()):
        if proc.poll() is not None:
            _children.pop(proc.pid, None)
            raise ServerError(f"prefect server start exited with code {proc.returncode} (log {log}):\n"
                              f"{_log_tail(offset)}")
        if time.monotonic() > deadline:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            _children.pop(proc.pid, None)
            raise ServerError(f"the Prefect server on port {port} did not answer within {timeout:g} s; stopped it "
                              f"(log {log}):\n{_log_tail(offset)}")
        time.sleep(0.2)
    info = {"pid": proc.pid, "port": port, "api_url": url, "ui_url": ui_url(port), "started_at": _now(),
            "log": str(log), "prefect_home": str(data_dir())}
    _write_info(info)
    return info


def start(port: int | None = None, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
    """Start the local server unless it already runs; return its record (``server_info()``) with ``started``: did
    this call start it.

    Port: ``port`` if given (it must be free), else 4200 if free, else any free port. Idempotent: a healthy
    recorded server is returned as it is (``ServerError`` if ``port`` asks for a different one). Two processes
    calling this at once start one server (the second waits on the lock, then finds the first's).
    """
    with _locked():
        info = _usable_recorded_server()
        if info is not None:
            if port is not None and port != info["port"]:
                raise ServerError(f"the local Prefect server already runs on port {info['port']} ({info['ui_url']}); "
                                  f"`slurmctl server stop` it first to start it on port {port}")
            return {**info, "started": False}
        if port is not None:
            if not port_free(port):
                raise ServerError(f"port {port} is in use on {HOST}; choose another --port, or leave it out")
            return {**_launch(port, timeout), "started": True}
        for attempt in range(PORT_ATTEMPTS):
            chosen = DEFAULT_PORT if attempt == 0 and port_free(DEFAULT_PORT) else _any_free_port()
            try:
                return {**_launch(chosen, timeout), "started": True}
            except ServerError:
                # Another process took the port between our check and the server's bind: try another one.
                if port_free(chosen) or attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")


def _usable_recorded_server() -> dict[str, Any] | None:
    """Under the lock: the recorded server if it answers; one that is alive but silent gets a grace period, then is
    stopped; a dead one's record is removed."""
    info = server_info()
    if info is None:
        return None
    if _is_server(info["pid"]):
        deadline = time.monotonic() + UNRESPONSIVE_GRACE_S
        while _is_server(info["pid"]):
            if healthy(info["api_url"]):
                return info
            if time.monotonic() > deadline:
                _terminate(info["pid"])
                break
            time.sleep(0.5)
    state_file().unlink(missing_ok=True)
    return None


def ensure(timeout: float = START_TIMEOUT_S) -> str:
    """The local server's API URL: the recorded server if it answers, else a new one (started on first use)."""
    info = running()
    if info is None:
        info = start(timeout=timeout)
    return info["api_url"]


# --- stopping ---------------------------------------------------------------------------------------------------
def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the server leads its own process group (start_new_session)


def _wait_gone(pid: int, timeout: float) -> bool:
    proc = _children.get(pid)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            return True
        if proc is None and not pid_alive(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _terminate(pid: int) -> None:
    _signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pid, STOP_TIMEOUT_S):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(pid, STOP_TIMEOUT_S)
    proc = _children.pop(pid, None)
    if proc is not None:
        proc.wait()


def stop() -> dict[str, Any] | None:
    """Stop the recorded server (SIGTERM to its process group, SIGKILL after ``STOP_TIMEOUT_S``), wait until it has
    exited, and remove ``server.json``. Returns the record of what was stopped, or None if nothing was running."""
    with _locked():
        info = server_info()
        if info is None:
            return None
        was_running = _is_server(info["pid"])
        if was_running:
            _terminate(info["pid"])
        state_file().unlink(missing_ok=True)
        return info if was_running else None


def status() -> dict[str, Any]:
    """``running`` (its process is alive), ``healthy`` (``/api/health`` answers), ``url``, ``ui_url``, ``pid``,
    ``port``, ``since``, ``log`` and ``prefect_home``."""
    info = server_info() or {}
    alive = bool(info) and _is_server(info["pid"])
    return {"running": alive, "healthy": alive and healthy(info["api_url"]),
            "url": info.get("api_url") if alive else None, "ui_url": info.get("ui_url") if alive else None,
            "pid": info.get("pid") if alive else None, "port": info.get("port") if alive else None,
            "since": info.get("started_at") if alive else None, "log": str(log_file()),
            "prefect_home": str(data_dir())}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
