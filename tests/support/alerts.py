"""What an alert leaves behind: the webhook requests it made, and the events a job emitted (read back from the API).

    with WebhookReceiver() as hook:
        run_cli("alerts", "install", "--webhook", hook.url)
        ...
        alert = wait_for(lambda: hook.find(alert="slurmctl-job-failed", job_id="j"), 120, "the failed-run alert")
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx

from support.local_server import LocalHttpServer


class WebhookReceiver(LocalHttpServer):
    """A webhook endpoint in the test process: every request's JSON body, with ``received`` (time.time()) added."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    data = json.loads(body)
                except ValueError:
                    data = {"raw": body.decode(errors="replace")}
                with receiver._lock:
                    receiver.requests.append({**data, "path": self.path, "received": time.time()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def find(self, **fields: Any) -> list[dict[str, Any]]:
        """The requests whose body has these field values (e.g. ``alert=..., job_id=...``)."""
        with self._lock:
            return [r for r in self.requests if all(r.get(k) == v for k, v in fields.items())]


def job_events(api_url: str, job_id: str, prefix: str = "slurmctl.job.") -> list[dict[str, Any]]:
    """The events of the resource ``slurmctl.job.<job_id>`` whose name starts with ``prefix``, oldest first."""
    body = {"filter": {"resource": {"id": [f"slurmctl.job.{job_id}"]}, "event": {"prefix": [prefix]},
                       "order": "ASC"}, "limit": 50}
    response = httpx.post(f"{api_url}/events/filter", json=body, timeout=30)
    response.raise_for_status()
    return response.json()["events"]
