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


SERVER_BUSY_S = 180.0  # how long one query may go unanswered before it counts as broken (the chain's safety net)


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    """POST a query to the Prefect server, asked again while it does not answer: under a loaded CI run its SQLite
    left ``/automations/filter`` unanswered for 30 s once (a ReadTimeout failed the test, not the alert)."""
    deadline = time.monotonic() + SERVER_BUSY_S
    while True:
        try:
            response = httpx.post(url, json=body, timeout=30)
            response.raise_for_status()
            return response
        except (httpx.TimeoutException, httpx.TransportError):
            if time.monotonic() > deadline:
                raise


def server_events(api_url: str, *, names: list[str] | None = None, prefix: str | None = None,
                  resource_id: str | None = None, related_id: str | None = None) -> list[dict[str, Any]]:
    """The newest 50 events the Prefect server recorded (its ``/events/filter`` answers 50 at most), oldest first:
    by name or name prefix, resource id, related resource id."""
    flt: dict[str, Any] = {"order": "DESC"}
    if names or prefix:
        flt["event"] = {**({"name": names} if names else {}), **({"prefix": [prefix]} if prefix else {})}
    if resource_id:
        flt["resource"] = {"id": [resource_id]}
    if related_id:
        flt["related"] = {"id": [related_id]}
    return post(f"{api_url}/events/filter", {"filter": flt, "limit": 50}).json()["events"][::-1]


class AlertChain:
    """An alert, followed on the Prefect server through the records it leaves, each waited for in turn:

    1. the event the automation evaluates (``event`` of ``resource``, e.g. ``prefect.flow-run.Failed`` of a flow
       run, or a ``slurmctl.job.*`` event of a job): recorded by the server's event persister;
    2. ``prefect.automation.triggered`` of the automation, for that resource (its ``triggering_labels``): the
       server's triggers service evaluated the event (or, proactive, the missing one) and fired;
    3. ``prefect.automation.action.executed`` (or ``.failed``, with the reason) related to that firing: the
       actions service called the webhook, which answered;
    4. the request in our receiver.

    Each stage is a fact the server records, so a test waits for it to happen rather than guessing how long the
    server takes (its services run on their own clocks: event batches every 5 s, proactive checks every 5 s, and
    on a loaded 2-core machine SQLite turns seconds into tens of seconds). The timeouts are safety nets for a chain
    that broke, and the failure says which link did.
    """

    def __init__(self, api_url: str, automation: str, resource_id: str) -> None:
        self.api_url, self.automation, self.resource_id = api_url, automation, resource_id
        ids = [a for a in post(f"{api_url}/automations/filter", {}).json() if a["name"] == automation]
        assert len(ids) == 1, f"automation {automation!r} installed {len(ids)} times"
        self.automation_resource = f"prefect.automation.{ids[0]['id']}"

    def evaluated_event(self, names: list[str], timeout: float, after: float = 0.0) -> dict[str, Any]:
        """Stage 1: the newest recorded event named one of ``names`` for the resource (occurred after ``after``,
        a time.time())."""
        from support.jobs import wait_for

        def found() -> dict[str, Any] | None:
            events = [e for e in server_events(self.api_url, names=names, resource_id=self.resource_id)
                      if _epoch(e["occurred"]) > after]
            return events[-1] if events else None

        return wait_for(found, timeout, f"the Prefect server to record {' or '.join(names)} of {self.resource_id} "
                                        f"(its event persister writes every 5 s)")

    def fired(self, timeout: float, after: float = 0.0) -> dict[str, Any]:
        """Stage 2: the automation's ``prefect.automation.triggered`` for the resource (after ``after``)."""
        from support.jobs import wait_for

        def found() -> dict[str, Any] | None:
            events = [e for e in server_events(self.api_url, names=["prefect.automation.triggered"],
                                               resource_id=self.automation_resource)
                      if (e["payload"].get("triggering_labels") or {}).get("prefect.resource.id") == self.resource_id
                      and _epoch(e["occurred"]) > after]
            return events[-1] if events else None

        try:
            return wait_for(found, timeout, f"the Prefect server's triggers service to fire {self.automation} for "
                                            f"{self.resource_id} (prefect.automation.triggered)")
        except AssertionError as exc:
            raise AssertionError(f"{exc}{self._diagnosis()}") from None

    def acted(self, firing: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Stage 3: the action's outcome for that firing; fails with the server's reason if the call failed."""
        from support.jobs import wait_for

        def found() -> dict[str, Any] | None:
            events = server_events(self.api_url, prefix="prefect.automation.action.",
                                   related_id=f"prefect.event.{firing['id']}")
            done = [e for e in events if e["event"] in ("prefect.automation.action.executed",
                                                        "prefect.automation.action.failed")]
            return done[-1] if done else None

        outcome = wait_for(found, timeout, f"the Prefect server's actions service to act on {self.automation}'s "
                                           f"firing {firing['id']} (prefect.automation.action.executed)")
        assert outcome["event"] == "prefect.automation.action.executed", outcome["payload"]
        return outcome

    def _diagnosis(self) -> str:
        """What the server recorded of the automation, for a timeout's message."""
        try:
            seen = server_events(self.api_url, resource_id=self.automation_resource)
        except Exception as exc:  # noqa: BLE001 (diagnosis only)
            return f"; its events could not be read: {exc!r}"
        return "; the automation's events: " + json.dumps(
            [(e["event"], e["occurred"], e["payload"].get("triggering_labels")) for e in seen][-10:])


def _epoch(occurred: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(occurred.replace("Z", "+00:00")).timestamp()


def job_events(api_url: str, job_id: str, prefix: str = "slurmctl.job.") -> list[dict[str, Any]]:
    """The events of the resource ``slurmctl.job.<job_id>`` whose name starts with ``prefix``, oldest first."""
    body = {"filter": {"resource": {"id": [f"slurmctl.job.{job_id}"]}, "event": {"prefix": [prefix]},
                       "order": "ASC"}, "limit": 50}
    return post(f"{api_url}/events/filter", body).json()["events"]
