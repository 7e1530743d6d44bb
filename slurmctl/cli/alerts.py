"""``slurmctl alerts install|list|remove``: slurmctl's Prefect automations on the current Prefect API.

The API is ``PREFECT_API_URL``, else the local Prefect server of the embedded default (started if needed, as
``submit`` does). The automations themselves are defined in ``slurmctl.deployments.automations``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slurmctl.cli.common import EXIT_OK, EXIT_USAGE, _err
from slurmctl.control.server import local_prefect_server, prefect_api


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "alerts", help="Prefect automations that alert on stalled, failing or token-starved jobs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="slurmctl's alerts, as automations on the current Prefect API (PREFECT_API_URL, else the "
                    "local server): a job stalled (no batch committed in --stall-minutes), an error rate or a "
                    "token wait above the job config's alerts: thresholds, a job flow run failed or crashed.",
        epilog="examples:\n  slurmctl alerts install --webhook https://hooks.example.com/slurmctl --stall-minutes 15\n"
               "  slurmctl alerts install --notify slack-webhook/ops\n  slurmctl alerts list --json\n"
               "  slurmctl alerts remove")
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("install", help="create or update the automations (idempotent)")
    s.add_argument("--webhook", metavar="URL", help="POST a JSON body to URL when an alert fires (saved as the "
                                                    "Webhook block slurmctl-alerts-webhook)")
    s.add_argument("--notify", metavar="TYPE/NAME", help="also send through this saved notification block, e.g. "
                                                        "slack-webhook/ops")
    s.add_argument("--stall-minutes", type=float, default=10.0,
                   help="alert when a running job commits no batch for this long (default 10; at least 10 s)")
    actions.add_parser("list", help="the installed automations").add_argument("--json", action="store_true")
    actions.add_parser("remove", help="delete the automations (slurmctl-*)")
    p.set_defaults(func=cmd_alerts)


def _describe(a: Any) -> dict[str, Any]:
    trigger = a.trigger
    return {"name": a.name, "id": str(a.id), "enabled": a.enabled, "description": a.description,
            "posture": getattr(getattr(trigger, "posture", None), "value", None),
            "expect": sorted(getattr(trigger, "expect", []) or []),
            "within_s": trigger.within.total_seconds() if getattr(trigger, "within", None) is not None else None,
            "actions": [act.type for act in a.actions]}


def cmd_alerts(args: argparse.Namespace) -> int:
    from slurmctl.deployments import automations

    with prefect_api(local_prefect_server()):
        if args.action == "install":
            settings = automations.AlertSettings(stall_minutes=args.stall_minutes, webhook_url=args.webhook,
                                                 notify_block=args.notify)
            try:
                done = automations.install(settings)
            except automations.AlertsError as exc:
                _err(str(exc))
                return EXIT_USAGE
            for a in done:
                print(f"{a.name}: {a.description} -> {', '.join(act.type for act in a.actions)}")
            return EXIT_OK
        if args.action == "remove":
            names = automations.remove()
            print(f"removed {', '.join(names)}" if names else "no slurmctl automations installed", file=sys.stderr)
            return EXIT_OK
        views = [_describe(a) for a in automations.installed()]
        if getattr(args, "json", False):
            print(json.dumps(views))
        else:
            for v in views:
                print(f"{v['name']:<26} {'on ' if v['enabled'] else 'off'} {v['description']} "
                      f"-> {', '.join(v['actions'])}")
            if not views:
                print("no slurmctl automations installed: `slurmctl alerts install`", file=sys.stderr)
        return EXIT_OK
