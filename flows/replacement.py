"""Replacing Slurm worker jobs before they retire, so throughput does not dip at each walltime.

A worker retires shortly before its job's walltime (``slurmctl.walltime``), and a new Slurm job takes a while to
start (queue wait, Python imports: ~15 s on the test cluster, minutes on a busy one). The cluster's adaptive scaling
would only ask for a replacement once the old worker has gone. So the coordinator looks at its worker jobs' time
left (one ``squeue`` every few seconds) and, for each job within ``replace_ahead_s`` of its retirement, lets the
adaptive scaling keep one job more (its minimum and maximum raised by one job's workers): the replacement starts
while its predecessor still works, and the bounds come back as the predecessor leaves. For that while the job holds
up to ``max_jobs`` plus its retiring jobs.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from typing import Any

from slurmctl.config import JobConfig
from slurmctl.slurm import duration_s, slurm_job_name, squeue
from slurmctl.walltime import default_stagger_s

log = logging.getLogger("slurmctl.flows.replacement")

POLL_S = 5.0


class Replacements:
    """Tick it from the coordinator's loop; it does nothing for a LocalCluster or with ``replace_ahead_s: 0``."""

    def __init__(self, cfg: JobConfig, client: Any, logger: Any = None) -> None:
        self.logger = logger or log
        cluster = cfg.cluster
        self.adaptive = getattr(getattr(client, "cluster", None), "_adaptive", None)
        self.active = (cluster.kind == "slurm" and getattr(cluster, "replace_ahead_s", 0) > 0
                       and self.adaptive is not None and shutil.which("squeue") is not None)
        if not self.active:
            return
        wall = duration_s(cluster.walltime) or 0.0
        stagger = default_stagger_s(wall) if cluster.retire_stagger_s is None else cluster.retire_stagger_s
        # A job counts as retiring ``replace_ahead_s`` before it retires, but at most a quarter of its walltime
        # (a 1-minute job would otherwise overlap its replacement for half its life) and never in its first quarter:
        # at most one extra job per job, each only near its end.
        ahead = min(cluster.replace_ahead_s, 0.25 * wall)
        self.threshold_s = min(cluster.retire_margin_s + stagger + ahead, 0.75 * wall)
        self.name = slurm_job_name(cfg.job_id)
        self.per_job = cluster.processes
        self.base = (self.adaptive.minimum, self.adaptive.maximum)
        self.retiring: set[str] = set()
        self.last = 0.0

    def tick(self) -> None:
        if not self.active or time.monotonic() - self.last < POLL_S:
            return
        self.last = time.monotonic()
        try:
            left = self.time_left()
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("squeue failed: %s", exc)
            return
        retiring = {job for job, seconds in left.items() if seconds is not None and seconds <= self.threshold_s}
        if retiring != self.retiring:
            self.retiring = retiring
            extra = len(retiring) * self.per_job
            self.adaptive.minimum = self.base[0] + extra
            self.adaptive.maximum = self.base[1] + extra
            self.logger.info("%s worker job(s) retire soon (%s): the cluster keeps %s worker(s) more meanwhile",
                     len(retiring), ", ".join(sorted(retiring)) or "none", extra)

    def time_left(self) -> dict[str, float | None]:
        out = squeue("--name", self.name, "-t", "RUNNING", "-o", "%i %L", timeout=20)  # raises: the last view holds
        return {parts[0]: duration_s(parts[1]) for line in out.splitlines() if len(parts := line.split()) == 2}
