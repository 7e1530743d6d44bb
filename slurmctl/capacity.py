"""What the Slurm cluster has free, what is queued, and when a job's workers would start (``slurmctl capacity``).

Everything comes from two commands, whatever the size of the queue: one ``sinfo`` (partitions, node states and
counts, CPUs allocated/idle/other/total, memory) and one ``squeue`` (every job: state, partition, CPUs, start and end
time, name), each with a fixed output format this module parses. Parsing and estimating are pure functions of that
text and a clock, so they are unit-tested from captured output; ``collect`` is the only part that runs anything.

Our own jobs are the worker jobs named ``slurmctl-<job_id>`` (``slurmctl.slurm.slurm_job_name``), grouped by job id.

How the start of a job's workers is estimated (``estimate``), for ``cores`` CPUs per worker job × ``max_jobs`` jobs
in its partition (``cluster.queue``, else the default partition), by CPU counts (not by how they fit on nodes):

* ``now`` when the partition's idle CPUs cover them;
* else CPUs come free as the running jobs of the partition reach their end time (their time limit: jobs that end
  early only make it sooner), and the jobs already pending in the partition take theirs first: the estimate is the
  first end time at which the idle plus freed CPUs cover the pending jobs' and ours; never before the latest start
  Slurm's scheduler expects for those pending jobs (``squeue``'s start time, the ``squeue --start`` data);
* ``never`` when the partition cannot hold them at all (a worker job wants more CPUs than any node has, or all the
  workers more CPUs than the partition's usable ones, for ``all_workers_start``);
* ``unknown`` when the partition is not up or nothing says when CPUs come free.

The same for the first worker job alone (``first_worker_start``): the job starts its work with the first worker.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import subprocess
from typing import Any

# partition | availability | node count | node state | CPUs A/I/O/T | memory per node (MB) | CPUs per node
SINFO_FORMAT = "%P|%a|%D|%T|%C|%m|%c"
# job id | state | partition(s) | CPUs | start (expected, for a pending job) | end | name (last: it may hold '|')
SQUEUE_FORMAT = "%i|%T|%P|%C|%S|%e|%j"
SINFO_CMD = ["sinfo", "-h", "-a", "-o", SINFO_FORMAT]
# -r: one line per array element, so a pending array counts its CPUs once per task
SQUEUE_CMD = ["squeue", "-h", "-a", "-r", "-o", SQUEUE_FORMAT]

OUR_PREFIX = "slurmctl-"
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "RESIZING", "SIGNALING"}
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
IDLE_NODE_STATES = {"idle"}
ALLOCATED_NODE_STATES = {"allocated", "alloc", "mixed", "mix", "completing", "comp"}
NODE_STATE_FLAGS = "*~#!%$@^-+"  # sinfo's suffixes: not responding, powered off, powering up, ...


class CapacityError(RuntimeError):
    """Slurm's commands are missing or failed; the message says what to do."""


def _int(s: str) -> int:
    try:
        return int(s.strip().rstrip("+"))
    except ValueError:
        return 0


def parse_time(s: str) -> _dt.datetime | None:
    """A Slurm time (``2026-11-24T13:45:00``, local time) as an aware datetime; None for N/A, Unknown, None."""
    s = s.strip()
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return t.astimezone() if t.tzinfo is None else t


def node_category(state: str) -> str:
    """``idle``, ``allocated`` or ``down`` (down, drained or draining, failing, not responding, maintenance, ...:
    nodes that take no new job) for one of sinfo's node states."""
    s = state.strip().lower()
    base = s.rstrip(NODE_STATE_FLAGS)
    if "*" in s:  # not responding
        return "down"
    if base in IDLE_NODE_STATES:
        return "idle"
    if base in ALLOCATED_NODE_STATES:
        return "allocated"
    return "down"


def parse_sinfo(text: str) -> dict[str, dict[str, Any]]:
    """Per-partition rows from ``sinfo -h -o SINFO_FORMAT`` (one line per partition and node state)."""
    parts: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 7:
            continue
        name, avail, nodes, state, cpus, memory, per_node = (f.strip() for f in fields[:7])
        default = name.endswith("*")
        name = name.rstrip("*")
        p = parts.setdefault(name, {
            "partition": name, "default": False, "available": avail, "nodes_total": 0, "nodes_idle": 0,
            "nodes_allocated": 0, "nodes_down": 0, "node_states": {}, "cpus_allocated": 0, "cpus_idle": 0,
            "cpus_other": 0, "cpus_total": 0, "memory_mb": None, "cpus_per_node": 0})
        p["default"] = p["default"] or default
        n = _int(nodes)
        p["nodes_total"] += n
        p[f"nodes_{node_category(state)}"] += n
        key = state.lower()
        p["node_states"][key] = p["node_states"].get(key, 0) + n
        a_i_o_t = [_int(x) for x in cpus.split("/")] if cpus.count("/") == 3 else [0, 0, 0, 0]
        for k, v in zip(("cpus_allocated", "cpus_idle", "cpus_other", "cpus_total"), a_i_o_t):
            p[k] += v
        mem = _int(memory)
        if mem and (p["memory_mb"] is None or mem < p["memory_mb"]):
            p["memory_mb"] = mem  # the smallest node's: what a worker job can count on
        p["cpus_per_node"] = max(p["cpus_per_node"], _int(per_node))
    return parts


def parse_squeue(text: str) -> list[dict[str, Any]]:
    """One dict per job (array element) from ``squeue -h -r -o SQUEUE_FORMAT``."""
    jobs = []
    for line in text.splitlines():
        fields = line.split("|", 6)
        if len(fields) < 7:
            continue
        job_id, state, partition, cpus, start, end, name = fields
        jobs.append({"id": job_id.strip(), "state": state.strip().upper(),
                     "partitions": [p for p in partition.strip().split(",") if p], "cpus": _int(cpus),
                     "start": parse_time(start), "end": parse_time(end), "name": name.strip()})
    return jobs


def _iso(t: _dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def summarize(sinfo: str, squeue: str) -> dict[str, Any]:
    """The capacity view: ``partitions`` (nodes, CPUs, memory, queue depth), ``queue`` (all jobs), ``ours`` (our
    worker jobs by slurmctl job id). JSON-ready, but for ``_jobs`` (the parsed jobs, for ``estimate``)."""
    parts = parse_sinfo(sinfo)
    jobs = parse_squeue(squeue)
    for p in parts.values():
        p.update(jobs_running=0, jobs_pending=0, cpus_pending=0, next_pending_start=None)
    queue = {"jobs_running": 0, "jobs_pending": 0, "jobs_other": 0}
    ours: dict[str, dict[str, Any]] = {}
    for j in jobs:
        kind = "running" if j["state"] in RUNNING_STATES else "pending" if j["state"] in PENDING_STATES else "other"
        queue[f"jobs_{kind}"] += 1
        for name in j["partitions"]:
            p = parts.get(name)
            if p is None or kind == "other":
                continue
            p[f"jobs_{kind}"] += 1
            if kind == "pending":
                p["cpus_pending"] += j["cpus"]
                if j["start"] is not None:
                    seen = p["next_pending_start"]
                    p["next_pending_start"] = j["start"] if seen is None else min(seen, j["start"])
        if j["name"].startswith(OUR_PREFIX) and kind != "other":
            o = ours.setdefault(j["name"][len(OUR_PREFIX):], {
                "job_id": j["name"][len(OUR_PREFIX):], "partitions": [], "running": 0, "pending": 0,
                "cpus_running": 0, "cpus_pending": 0})
            o[kind] += 1
            o[f"cpus_{kind}"] += j["cpus"]
            o["partitions"] = sorted(set(o["partitions"]) | set(j["partitions"]))
    rows = sorted(parts.values(), key=lambda p: (not p["default"], p["partition"]))
    for p in rows:
        p["next_pending_start"] = _iso(p["next_pending_start"])
    return {"partitions": rows, "queue": queue, "ours": sorted(ours.values(), key=lambda o: o["job_id"]),
            "_jobs": jobs}


def _start_for(cpus: int, part: dict[str, Any], jobs: list[dict[str, Any]], now: _dt.datetime) -> tuple[str, str]:
    """(start, why) for ``cpus`` CPUs in partition ``part``: ``now``, an ISO time, ``never`` or ``unknown``."""
    if cpus > part["cpus_total"] - part["cpus_other"]:
        return "never", f"{cpus} CPUs > the {part['cpus_total'] - part['cpus_other']} usable in the partition"
    if part["cpus_idle"] >= cpus:
        return "now", f"{part['cpus_idle']} CPUs idle"
    name = part["partition"]
    mine = [j for j in jobs if name in j["partitions"]]
    pending = [j for j in mine if j["state"] in PENDING_STATES]
    ahead = sum(j["cpus"] for j in pending)
    pending_starts = [j["start"] for j in pending if j["start"] is not None]
    not_before = max(pending_starts, default=None)
    free = part["cpus_idle"]
    for j in sorted((j for j in mine if j["state"] in RUNNING_STATES and j["end"] is not None),
                    key=lambda j: j["end"]):
        free += j["cpus"]
        if free >= cpus + ahead:
            at = max(j["end"], not_before) if not_before else j["end"]
            at = max(at, now)
            why = (f"when running jobs reach their time limits, {cpus + ahead} CPUs are free (ours {cpus}, pending "
                   f"ahead {ahead})")
            if not_before is not None and at == not_before:
                why = f"after the {len(pending)} pending jobs ahead (Slurm expects the last to start then)"
            return _iso(at) or "unknown", why
    if not_before is not None:
        return _iso(max(not_before, now)) or "unknown", \
            f"not before the {len(pending)} pending jobs ahead (Slurm expects the last to start then)"
    return "unknown", "no running job has an end time and no pending job an expected start"


def estimate(view: dict[str, Any], queue: str | None, cores: int, max_jobs: int,
             now: _dt.datetime | None = None) -> dict[str, Any]:
    """When the workers of a job (``max_jobs`` Slurm jobs of ``cores`` CPUs in partition ``queue``, None: the
    default partition) would start, from a ``summarize`` view; see the module's docstring for how."""
    now = now or _dt.datetime.now().astimezone()
    parts = {p["partition"]: p for p in view["partitions"]}
    name = queue or next((p["partition"] for p in view["partitions"] if p["default"]), None)
    out: dict[str, Any] = {"partition": name, "cores_per_worker_job": cores, "worker_jobs": max_jobs,
                           "cpus_needed": cores * max_jobs, "cpus_idle": None, "first_worker_start": "unknown",
                           "all_workers_start": "unknown", "basis": ""}
    part = parts.get(name) if name else None
    if part is None:
        known = ", ".join(parts) or "none"
        out["basis"] = (f"no partition {name!r} (partitions: {known}); set cluster.queue to one of them" if name
                        else f"no default partition: set cluster.queue (partitions: {known})")
        return out
    out["cpus_idle"] = part["cpus_idle"]
    if part["available"].lower() != "up":
        out["basis"] = f"partition {name} is {part['available']}: no job starts there until it is up"
        return out
    if part["cpus_per_node"] and cores > part["cpus_per_node"]:
        out.update(first_worker_start="never", all_workers_start="never",
                   basis=f"a worker job wants {cores} CPUs; the nodes of {name} have at most {part['cpus_per_node']}")
        return out
    first, why_first = _start_for(cores, part, view["_jobs"], now)
    every, why_all = _start_for(cores * max_jobs, part, view["_jobs"], now)
    out.update(first_worker_start=first, all_workers_start=every,
               basis=f"first worker: {why_first}; all {max_jobs}: {why_all}")
    return out


def run_slurm(cmd: list[str]) -> str:
    """Run one Slurm query; its stdout. A missing command or a failure raises ``CapacityError`` saying why."""
    if shutil.which(cmd[0]) is None:
        raise CapacityError(f"`{cmd[0]}` is not on PATH: run `slurmctl capacity` on a Slurm submit host")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise CapacityError(f"`{' '.join(cmd)}` did not answer in 60 s: is slurmctld up? (`scontrol ping`)") from None
    if out.returncode != 0:
        raise CapacityError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()[:500]}; is "
                            f"slurmctld up? (`scontrol ping`)")
    return out.stdout


def collect() -> dict[str, Any]:
    """The capacity view of this cluster now: one ``sinfo`` and one ``squeue`` call."""
    return summarize(run_slurm(SINFO_CMD), run_slurm(SQUEUE_CMD))
