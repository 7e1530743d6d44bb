"""``slurmctl server start|stop|status``: the local Prefect server (UI and API) of the embedded default."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slurmctl.cli.common import EXIT_FAILED, EXIT_OK, _err


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "server", help="the local Prefect server (UI and API) jobs use when PREFECT_API_URL is not set",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The local Prefect server of the embedded default: started on first use by `submit`/`resume`, "
                    "kept running for the next job.\nData in $SLURMCTL_HOME/prefect, log in "
                    "$SLURMCTL_HOME/logs/prefect-server.log. An explicit PREFECT_API_URL wins over it.",
        epilog="examples:\n  slurmctl server start              # port 4200, or a free one if 4200 is taken\n"
               "  export PREFECT_API_URL=$(slurmctl server start --port 4300)\n"
               "  slurmctl server status --json       # exit 0 if it answers, 1 if not\n"
               "  slurmctl server stop")
    server_sub = p.add_subparsers(dest="action", required=True)
    for name, what in (("start", "start it unless it runs; print its API URL"),
                       ("stop", "stop it and any spare coordinator waiting for the next job (its database stays "
                                "for the next start; a job still running loses its Prefect API)"),
                       ("status", "is it running and answering; its URLs, pid, log (exit 1 if it does not answer)")):
        full = what.replace(" it", " the local Prefect server", 1)
        s = server_sub.add_parser(name, help=what, description=full[0].upper() + full[1:] + ".")
        if name == "start":
            s.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 4200 if free, else any free port)")
        if name == "status":
            s.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_server)


def cmd_server(args: argparse.Namespace) -> int:
    from slurmctl import prefect_server

    if args.action == "start":
        if prefect_server.running() is None:
            print("starting the local Prefect server ...", file=sys.stderr, flush=True)
        try:
            info = prefect_server.start(port=args.port)
        except prefect_server.ServerError as exc:
            _err(str(exc))
            return EXIT_FAILED
        print(info["api_url"])
        print(f"Prefect server {'started' if info['started'] else 'already running'} (pid {info['pid']}): UI "
              f"{info['ui_url']}, API {info['api_url']}, log {info['log']}", file=sys.stderr)
        return EXIT_OK
    if args.action == "stop":
        from slurmctl.control import spare

        if spare.stop_all():  # they would report to the server stopped now
            print("stopped the spare coordinator(s) waiting for the next job", file=sys.stderr)
        stopped = prefect_server.stop()
        print(f"stopped the local Prefect server (pid {stopped['pid']}, {stopped['ui_url']})" if stopped
              else "no local Prefect server is running", file=sys.stderr)
        return EXIT_OK
    from slurmctl.control import spare

    view = {**prefect_server.status(), "spare_coordinators": spare.waiting() or None}  # pids, when some wait
    if args.json:
        print(json.dumps(view))
    else:
        width = max(len(k) for k in view)
        for k, v in view.items():
            if v is not None:
                print(f"{k:<{width}}  {v}")
    return EXIT_OK if view["healthy"] else EXIT_FAILED
