"""Starting and stopping the real server processes tests talk to (Prefect, moto): ports, readiness, shutdown."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's scripts: prefect, moto_server


def moto_command(port: int) -> list[str]:
    """A moto server on 127.0.0.1:``port`` that applies one write at a time, as real AWS applies a conditional
    write atomically (``support/moto_atomic.py`` says why)."""
    return [sys.executable, str(Path(__file__).with_name("moto_atomic.py")), "-H", "127.0.0.1", "-p", str(port)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now, below the kernel's ephemeral range. A port bound to 0
    comes from that range, where any process's next outgoing connection may take it before the server a test starts
    binds it (CI, with two test streams and their servers side by side: a `server start --port` found its port in
    use). Below the range only another listener can take it, and the ports are drawn at random."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low > 2048:
        for _ in range(200):
            port = random.randint(max(1024, low - 12000), low - 1)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until ``url`` answers; fail early (with its log) if ``proc`` exits first."""
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
    """Terminate a server process, and kill it if it does not exit within 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def benchmark_env(tmp: Path, root: Path) -> dict[str, str]:
    """The environment a benchmark's jobs run in: their own SLURMCTL_HOME under ``tmp``, our benchmarks and test
    support importable (handlers the benchmarks name live there), and no spare coordinators unless the caller's
    environment asks for them: each cell's job runs in a folder of its own, so each would leave a spare of its own,
    importing in the background while the next cell is measured."""
    import os

    return {"SLURMCTL_SPARE_COORDINATOR": "0", **os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "SLURMCTL_HOME": str(tmp / "home"),
            "PYTHONPATH": os.pathsep.join([str(root / "benchmarks"), str(root / "tests")])}


def start_prefect_server(env: dict[str, str], home: Path) -> subprocess.Popen:
    """A Prefect server of its own (its database under ``home``) for the jobs of one run; ``env`` gets its
    PREFECT_API_URL. Returns once it answers."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env={**env, "PREFECT_HOME": str(home), "PREFECT_API_URL": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    wait_http(env["PREFECT_API_URL"] + "/health", 180, proc)
    return proc
