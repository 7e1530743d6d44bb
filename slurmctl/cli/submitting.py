"""``slurmctl submit`` (start a job here, as a Slurm job, or as a run of a Prefect deployment) and
``slurmctl iam-policy`` (what a job needs from AWS)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from slurmctl.cli.common import EXIT_OK, EXIT_USAGE, _err, command
from slurmctl.cli.watching import flow_run_link, watch
from slurmctl.config import ConfigError, JobConfig, job_config
from slurmctl.control import launch


def add_parser(sub: Any) -> None:
    p = command(sub, "submit", help="validate a job config and start the job", examples=[
        "slurmctl submit examples/echo/config.yaml --wait",
        "slurmctl submit backfill.yaml --date 2025-04-12     # {date} in the config becomes 2025-04-12",
        "slurmctl submit job.yaml --deployment job           # as a run of slurmctl-job/job on its workers",
        "slurmctl submit job.yaml --sample 20                # measure calls/item on 20 real items (budget)"])
    p.add_argument("config", help="path to the job's YAML config")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends; exit 0 if it completed")
    p.add_argument("--on", choices=["local", "slurm"], default=None,
                   help="where the coordinator runs: here, or as a Slurm job of its own that the next one continues "
                        "when its walltime comes (default: cluster.coordinator.on)")
    p.add_argument("--job-id", help="override the config's job_id")
    p.add_argument("--date", help="the date put in place of {date} in the config (YYYY-MM-DD; default today)")
    p.add_argument("--deployment", metavar="NAME",
                   help="start the job as a run of this Prefect deployment (e.g. slurmctl-job/example-echo; a name "
                        "alone means slurmctl-job/NAME): it runs on that deployment's workers, like a run started "
                        "from the UI")
    p.add_argument("--sample", type=int, metavar="N",
                   help="before admitting the job, run its handler on the input's first N items to measure API calls "
                        "and time per item for the budget's projection (THIS CALLS THE REAL API; nothing is written)")
    p.set_defaults(func=cmd_submit)
    p = command(
        sub, "iam-policy", help="print the least-privilege IAM policy a job needs (S3 prefix, DynamoDB items)",
        description="The IAM policy document for one job's coordinator and workers: its objects in the store's "
                    "prefix, its S3 input, its rate-limit items in the DynamoDB table (by partition key), the KMS "
                    "key of an encrypted store.",
        examples=["slurmctl iam-policy jobs/geocode.yaml --account 123456789012 > policy.json",
                  "slurmctl iam-policy backfill.yaml --date 2025-04-12 --create-table"])
    p.add_argument("config", help="path to the job's YAML config")
    p.add_argument("--account", default="*", help="AWS account id of the DynamoDB table (default *)")
    p.add_argument("--region", help="region of the DynamoDB table (default: the config's, else *)")
    p.add_argument("--create-table", action="store_true",
                   help="also allow creating the DynamoDB table (admission creates a missing one)")
    p.add_argument("--date", help="the date for {date} in the config (default today)")
    p.set_defaults(func=cmd_iam_policy)


def cmd_submit(args: argparse.Namespace) -> int:
    import datetime as dt

    try:
        cfg = job_config(args.config, job_id=args.job_id, date=args.date or dt.date.today())
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    sample, problems = sample_for(args, cfg)
    if problems:
        _err(f"{args.config}: cannot submit\n" + "\n".join(f"  {f}: {m}" for f, m in problems))
        return EXIT_USAGE
    from slurmctl.books.manifests import Keys

    try:  # SubmitFailed (the job exists, not started: the message says what to do) exits 1 (cli.root)
        if args.deployment:
            return submit_to_deployment(args, cfg, sample)
        launched = launch.start(cfg, str(Path(args.config).resolve()), sample, getattr(args, "on", None))
    except launch.SubmitRefused as exc:
        _err(f"{args.config}: {exc}")
        return EXIT_USAGE
    job, store, proc, log, server = (launched.job, launched.store, launched.proc, launched.log, launched.server)
    print(cfg.job_id)
    print(f"submitted {cfg.job_id} (store {store.uri(Keys(cfg.job_id).root)}, log {log})", file=sys.stderr)
    _budget_note(cfg, job)
    if not args.wait:
        if server:
            print(f"Prefect UI: {server['ui_url']}/runs", file=sys.stderr)
        print(f"follow it with `slurmctl status {cfg.job_id}`", file=sys.stderr)
        return EXIT_OK
    return watch(cfg.job_id, cfg.storage, proc, log, announce=flow_run_link(server, None))


def submit_to_deployment(args: argparse.Namespace, cfg: JobConfig, sample: Any = None) -> int:
    """``submit --deployment``: admit the job here, then create a flow run of the deployment for it."""
    job, run, name = launch.start_as_deployment_run(cfg, str(Path(args.config).resolve()), args.deployment, sample)
    print(cfg.job_id)
    print(f"submitted {cfg.job_id} as flow run {run.name} ({run.id}) of deployment {name}; its work pool's worker "
          f"runs it", file=sys.stderr)
    _budget_note(cfg, job)
    if not args.wait:
        print(f"follow it with `slurmctl status {cfg.job_id}`", file=sys.stderr)
        return EXIT_OK
    return watch(cfg.job_id, cfg.storage, None, None)


def sample_for(args: argparse.Namespace, cfg: JobConfig) -> tuple[Any, list[tuple[str, str]]]:
    """``submit --sample N``: run the handler on the input's first N items to measure calls and time per item for
    the budget's projection (``slurmctl.books.budget.measure_sample``). It calls the real API, so it runs only when
    asked, and says so first. Returns the sample (None without ``--sample``) and the problems found."""
    if not getattr(args, "sample", None):
        return None, []
    if args.sample < 1:
        return None, [("--sample", "must be at least 1 item")]
    if not cfg.budget.limits:
        print(f"note: --sample {args.sample} skipped: the config sets no budget limit (budget.max_api_calls, "
              f"max_core_hours or max_usd) to project against", file=sys.stderr)
        return None, []
    from slurmctl.books.budget import measure_sample
    from slurmctl.books.store import reader_for

    print(f"--sample {args.sample}: calling the handler {cfg.handler} on the first {args.sample} items of "
          f"{cfg.input.describe()} to measure the API calls and time per item. THIS CALLS THE REAL API; nothing is written",
          file=sys.stderr, flush=True)
    try:
        sample = measure_sample(cfg, reader_for(cfg.storage), args.sample)
    except Exception as exc:  # an unimportable handler, an unreadable input: the same words as admission's
        return None, [("--sample", f"{type(exc).__name__}: {exc}")]
    if not sample.items:
        return None, [("--sample", f"no good item among the first records of {cfg.input.describe()}")]
    errors = f", {sum(sample.errors.values())} failed ({dict(sample.errors)})" if sample.errors else ""
    print(f"sample: {sample.items} items, {sample.calls} handler calls ({sample.calls_per_item:.3g} per item), "
          f"{sample.seconds_per_item:.3g} s per item{errors}", file=sys.stderr)
    return sample, []


def _budget_note(cfg: JobConfig, job: Any) -> None:
    from slurmctl.books.budget import projection_note

    note = projection_note(cfg, job.budget_projection if job is not None else None)
    if note:
        print(note, file=sys.stderr)


def cmd_iam_policy(args: argparse.Namespace) -> int:
    """Print the job's least-privilege IAM policy (``slurmctl.iam``)."""
    import datetime as dt

    from slurmctl.iam import policy_for

    try:
        cfg = job_config(args.config, date=args.date or dt.date.today())
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    policy = policy_for(cfg, account=args.account, region=args.region, create_table=args.create_table)
    print(json.dumps(policy, indent=2))
    if not policy["Statement"]:
        print("note: this job uses no AWS service (local store, local limiter, local input)", file=sys.stderr)
    return EXIT_OK
