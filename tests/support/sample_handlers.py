"""Handlers the tests run as real jobs. Plain Python; behaviour is driven by the job's ``params``.

``calls_file``: every call appends ``<pid> <item id>`` to it (O_APPEND: safe across worker processes), so tests count
handler calls across coordinators, workers and Slurm jobs. ``sleep_s`` slows each item down so tests can kill
things mid-run. ``fail`` (or the JSON file ``fail_file``, re-read on every call): ``{id: error_class}`` raises an ``ItemError`` of that class for those ids.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from slurmctl.errors import ItemError


def record_call(ctx: Any, item: dict[str, Any]) -> None:
    path = ctx.params.get("calls_file")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {item['id']}\n".encode())
        finally:
            os.close(fd)


def counting(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    record_call(ctx, item)
    if ctx.params.get("sleep_s"):
        time.sleep(float(ctx.params["sleep_s"]))
    fail = dict(ctx.params.get("fail") or {})
    if ctx.params.get("fail_file") and os.path.exists(ctx.params["fail_file"]):
        with open(ctx.params["fail_file"]) as f:
            fail.update(json.load(f))  # re-read per call: tests change it between runs
    cls = fail.get(str(item["id"]))
    if cls:
        raise ItemError(f"injected {cls} error", error_class=cls)
    return {"id": item["id"], "doubled": item["id"] * 2}


def calls(path: str) -> list[tuple[int, Any]]:
    """(pid, id) per recorded call."""
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path).read().splitlines():
        pid, item_id = line.split(" ", 1)
        out.append((int(pid), int(item_id) if item_id.lstrip("-").isdigit() else item_id))
    return out
