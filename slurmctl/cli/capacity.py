"""``slurmctl capacity``: the Slurm cluster's partitions, free and busy nodes and CPUs, the queue, our own worker
jobs, and (``--config``) when a job's workers would start. The work is in ``slurmctl.capacity``; this prints it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from slurmctl.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _err

# (header, value of a partition row): idle/allocated/down/total nodes and CPUs, so it fits 80 columns
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("PARTITION", lambda p: p["partition"] + ("*" if p["default"] else "")),
    ("AVAIL", lambda p: p["available"]),
    ("NODES I/A/D/T", lambda p: f"{p['nodes_idle']}/{p['nodes_allocated']}/{p['nodes_down']}/{p['nodes_total']}"),
    ("CPUS I/A/D/T", lambda p: f"{p['cpus_idle']}/{p['cpus_allocated']}/{p['cpus_other']}/{p['cpus_total']}"),
    ("MEM MB", lambda p: p["memory_mb"]),
    ("RUN/PEND", lambda p: f"{p['jobs_running']}/{p['jobs_pending']}"),
    ("NEXT PENDING START", lambda p: p["next_pending_start"])]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "capacity", help="partitions, idle/allocated/down nodes and CPUs, the queue and our worker jobs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="What the Slurm cluster has free and what is queued, from one `sinfo` and one `squeue` call: "
                    "per partition\nthe idle, allocated and down (or drained) nodes and CPUs, memory per node, "
                    "running and pending jobs;\nour own worker jobs (named slurmctl-<job_id>) by job. With --config, "
                    "when that job's workers\n(cluster.cores x cluster.max_jobs CPUs in cluster.queue) would start: "
                    "now if idle CPUs cover them,\nelse when running jobs' time limits free enough CPUs for the jobs "
                    "pending ahead and ours\n(never before Slurm's expected start of those), else unknown.",
        epilog="examples:\n  slurmctl capacity\n  slurmctl capacity --config job.yaml      # + when its workers "
               "would start\n  slurmctl capacity --json | jq '.partitions[] | {partition, cpus_idle}'")
    p.add_argument("--config", metavar="JOB.yaml", help="a job config: estimate when its Slurm workers would start")
    p.add_argument("--json", action="store_true", help="one JSON object (partitions, queue, ours, estimate)")
    p.set_defaults(func=cmd_capacity)


def _config_estimate(path: str, view: dict[str, Any]) -> dict[str, Any] | None:
    """The estimate for a job config; None (after saying why) when it has no Slurm cluster or is invalid."""
    import datetime as dt

    from slurmctl.capacity import estimate
    from slurmctl.config import ConfigError, job_config

    try:
        cfg = job_config(path, date=dt.date.today())
    except ConfigError as exc:
        _err(str(exc))
        return None
    cluster = cfg.cluster
    if getattr(cluster, "kind", None) != "slurm":
        _err(f"{path}: cluster.kind is {getattr(cluster, 'kind', None)!r}: its workers run on this machine, not "
             f"Slurm; set cluster.kind: slurm to estimate a Slurm start")
        return None
    return {"job_id": cfg.job_id, **estimate(view, cluster.queue, cluster.cores, cluster.max_jobs)}


def _cell(v: Any) -> str:
    return "—" if v is None else str(v)


def render(view: dict[str, Any], est: dict[str, Any] | None, console: Any = None) -> None:
    """Human output: a rich table on a terminal (``console``, or stdout's if it is one), plain columns otherwise."""
    rows = [[_cell(value(p)) for _, value in COLUMNS] for p in view["partitions"]]
    if console is None and sys.stdout.isatty():
        from rich.console import Console

        console = Console()
    if console is not None:
        from rich.table import Table

        table = Table(title="Slurm partitions (* default; I/A/D/T: idle/allocated/down/total)",
                      title_justify="left")
        for head, _ in COLUMNS:
            table.add_column(head, justify="right" if head in ("MEM MB", "RUN/PEND") else "left")
        for r in rows:
            table.add_row(*r)
        console.print(table)

        def say(line: str) -> None:
            console.print(line, markup=False, highlight=False)
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _) in enumerate(COLUMNS)]
        print("  ".join(h.ljust(w) for (h, _), w in zip(COLUMNS, widths)).rstrip())
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        say = print
    q = view["queue"]
    say(f"queue: {q['jobs_running']} running, {q['jobs_pending']} pending"
        + (f", {q['jobs_other']} other" if q["jobs_other"] else ""))
    if view["ours"]:
        say("our worker jobs:")
        for o in view["ours"]:
            say(f"  {o['job_id']}: {o['running']} running ({o['cpus_running']} CPUs), {o['pending']} pending "
                f"({o['cpus_pending']} CPUs) in {', '.join(o['partitions'])}")
    else:
        say("our worker jobs: none")
    if est is not None:
        say(f"job {est['job_id']}: {est['worker_jobs']} worker jobs x {est['cores_per_worker_job']} CPUs in "
            f"{est['partition']}: first worker {est['first_worker_start']}, all {est['all_workers_start']} "
            f"({est['basis']})")


def cmd_capacity(args: argparse.Namespace) -> int:
    from slurmctl.capacity import CapacityError, collect

    try:
        view = collect()
    except CapacityError as exc:
        _err(str(exc))
        return EXIT_FAILED
    est = None
    if args.config:
        est = _config_estimate(args.config, view)
        if est is None:
            return EXIT_USAGE
    view.pop("_jobs")
    if args.json:
        print(json.dumps({**view, "estimate": est}))
        return EXIT_OK
    render(view, est)
    return EXIT_OK
