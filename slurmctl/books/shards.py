"""Cutting batches into shards: how many Prefect task runs a job makes, and which batches each one processes.

A **batch** is data: the unit of commit, retry and exactly-once. A **shard** is execution: one Prefect task run that
processes several batches one after another, committing each on its own. Prefect costs ~80-150 ms per task run and
its UI and database degrade with thousands of task runs in one flow run, so the number of shards is bounded per job
run (``max_task_runs``, all phases together) whatever the job's size, while the number of batches is not.

Shards are planned from what is *not yet committed*, every time a phase starts: a resumed job re-cuts only its
uncommitted batches, and a shard whose worker died is queued again with only the batches it had not committed.

Sizing: equal shards of contiguous batches (one input range read covers a shard), a whole number of waves over the
worker threads so the last wave keeps every worker busy, ``WAVES`` waves for a small job (each shard long enough to
amortise Prefect's cost, and still spread over every worker), at most ``MAX_BATCHES_PER_SHARD`` batches per shard
for a large one (small task results, short re-runs), never more shards than the phase's share of the budget.

A job whose items run concurrently runs two shards per configured thread (``slurmctl.item_run.shards_per_thread``),
so that one keeps the calls in flight while the other changes shards. Its waves are still counted over the
configured threads (``waves_for``): counted over the doubled ones, a small job had twice the task runs, and each
task run's start costs its worker CPU (profiled: mostly Prefect building its client's TLS contexts and reading its
settings) while the other shard's requests wait for the core and miss their rate-limit slots. On the embedded
default's cluster such a job runs one wave: its workers start together and a lost one is restarted on the same
machine, so a second wave bought no balance (a worker killed at 40 % or 85 % of a job left the same tail), while its
shard changes cost about a hundredth of a short job's rate. Slurm workers come and go on Slurm's clock, and one
worker alone may not spend the job's rate (1 s answers at 500/s need 500 in flight; ``max_concurrency`` is 256),
so there the second wave lets the workers that are up take the shards of those that are not (a worker 15 s late on
a 55 s job measured the same either way; the wave is kept for workers a busy queue holds back longer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from slurmctl.config import JobConfig, LocalClusterConfig
from slurmctl.records import BatchSpec

WAVES = 4
SHARDS_PER_THREAD = 2  # shards a configured thread runs at once when items run concurrently (``item_run``)
MAX_BATCHES_PER_SHARD = 500


def waves_for(cfg: JobConfig, threads_per_slot: int) -> int:
    """Waves over the process phase's Dask threads when each configured thread runs ``threads_per_slot`` shards
    at once: ``WAVES`` over the configured threads, or one on the embedded default's cluster (module docstring)."""
    if threads_per_slot > 1 and isinstance(cfg.cluster, LocalClusterConfig):
        return 1
    return max(1, WAVES // max(1, threads_per_slot))


def concurrent_batches(cfg: JobConfig) -> int:
    """Batches one worker process runs at once when its items run concurrently: ``SHARDS_PER_THREAD`` per configured
    thread. Its items in flight are at most this times ``batch_size``, whatever ``concurrency: auto`` allows."""
    return SHARDS_PER_THREAD * cfg.cluster.worker_threads


def worker_slots(cfg: JobConfig) -> int:
    """Batches the job's cluster can run at once: worker processes x threads (the most it will ever have)."""
    c = cfg.cluster
    if isinstance(c, LocalClusterConfig):
        return c.n_workers * c.worker_threads
    return c.max_jobs * c.processes * c.worker_threads


@dataclass(frozen=True)
class Budget:
    """The task runs one run of the job may create, shared out between its phases.

    The aggregation keeps a twentieth; processing takes half of the rest; each retry round (the automatic ones plus
    one chosen with ``retry --errors=``) an equal part of the other half. A worker-loss re-queue is one more task
    run for the same batches, so a run that loses workers may go over by the number of re-queues (counted in the
    job manifest).
    """

    max_task_runs: int
    auto_retry_rounds: int

    @property
    def aggregate(self) -> int:
        return max(1, self.max_task_runs // 20)

    @property
    def process(self) -> int:
        return max(1, (self.max_task_runs - self.aggregate) // 2)

    @property
    def retry_round(self) -> int:
        rest = self.max_task_runs - self.aggregate - self.process
        return max(1, rest // (self.auto_retry_rounds + 1))

    @classmethod
    def of(cls, cfg: JobConfig) -> "Budget":
        return cls(cfg.max_task_runs, cfg.errors.auto_retry_rounds)


def shard_count(batches: int, slots: int, cap: int, waves: int = WAVES) -> int:
    """How many shards ``batches`` batches are cut into (see the module docstring): at least ``waves`` waves over
    ``slots`` threads."""
    if batches <= 0:
        return 0
    slots = max(1, slots)
    count = max(slots * waves, math.ceil(batches / MAX_BATCHES_PER_SHARD))
    count = min(math.ceil(count / slots) * slots, cap)
    if count >= slots:
        count -= count % slots  # whole waves, also when the budget binds
    return max(1, min(batches, count))


@dataclass(frozen=True)
class Shard:
    """Batches one task run processes, in plan order. ``name`` is the task run's name in the Prefect UI."""

    specs: tuple[BatchSpec, ...]

    @property
    def name(self) -> str:
        first, last = self.specs[0].batch_id, self.specs[-1].batch_id
        return first if first == last else f"{first}..{last.rsplit('-', 1)[-1]} ({len(self.specs)})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "specs": [s.to_dict() for s in self.specs]}

    @staticmethod
    def specs_of(shard: dict[str, Any]) -> list[BatchSpec]:
        return [BatchSpec.from_dict(s) for s in shard["specs"]]


def plan_shards(specs: Sequence[BatchSpec], slots: int, cap: int, waves: int = WAVES) -> list[Shard]:
    """Cut ``specs`` (the uncommitted batches, in plan order) into ``shard_count`` contiguous, near-equal shards."""
    n = shard_count(len(specs), slots, cap, waves)
    if not n:
        return []
    size, extra = divmod(len(specs), n)
    shards, pos = [], 0
    for i in range(n):
        take = size + (1 if i < extra else 0)
        shards.append(Shard(tuple(specs[pos:pos + take])))
        pos += take
    return shards
