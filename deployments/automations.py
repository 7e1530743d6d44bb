"""slurmctl's Prefect automations, kept here and installed by ``slurmctl alerts install``.

Four alerts, on the events ``slurmctl.flows.events`` emits (resource ``slurmctl.job.<job_id>``) and on Prefect's own:

* ``slurmctl-job-stalled`` — proactive: once a pass over batches starts (``slurmctl.job.processing``: the first
  pass or a retry round) and after each ``slurmctl.job.progress``, the server expects the next progress (or the pass
  or the job ending) within ``stall_minutes``, per job; it fires when none came. Workers waiting in the Slurm queue
  count as a stall; partitioning and aggregating do not. The Prefect server evaluates proactive triggers every
  ``PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY`` (5 s by default), so it fires within that of the deadline;
  Prefect refuses a window under 10 s. A progress event arriving after the deadline fires the alert itself, and
  the next one starts a new window.
* ``slurmctl-job-error-rate`` — reactive on ``slurmctl.job.error-rate`` (the job's ``alerts.error_rate_pct``).
* ``slurmctl-job-token-wait`` — reactive on ``slurmctl.job.token-wait`` (the job's ``alerts.token_wait_pct``).
* ``slurmctl-job-failed`` — reactive on ``prefect.flow-run.Crashed`` / ``Failed`` of flows named ``slurmctl-job``.

Each calls the webhook saved as the ``Webhook`` block ``slurmctl-alerts-webhook`` and/or sends a notification
through a notification block; with neither it only records its firing (the UI's event feed). Installing is
idempotent: ours are the automations named ``slurmctl-*``; each is updated in place, extras are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.automations import (
    AutomationCore,
    CallWebhook,
    DoNothing,
    EventTrigger,
    Posture,
    SendNotification,
)
from prefect.client.orchestration import get_client

from slurmctl.flows import events as ev

PREFIX = "slurmctl-"
WEBHOOK_BLOCK = "slurmctl-alerts-webhook"
JOB_FLOW = "slurmctl-job"
MIN_STALL_S = 10.0  # Prefect's minimum `within` for a proactive trigger

STALLED, ERROR_RATE, TOKEN_WAIT, FAILED = (f"{PREFIX}job-{s}" for s in ("stalled", "error-rate", "token-wait",
                                                                          "failed"))
SUMMARIES = {
    STALLED: "no batch committed in {stall}",
    ERROR_RATE: "error rate above the job's alerts.error_rate_pct",
    TOKEN_WAIT: "workers waited for rate-limit tokens above the job's alerts.token_wait_pct of their time",
    FAILED: "the job's flow run failed or crashed",
}
# The webhook's body (a Jinja template the server renders): which alert, which job, the event that fired it.
PAYLOAD = """{
  "alert": "{{ automation.name }}",
  "summary": "{{ automation.description }}",
  "job_id": "{{ event.resource['prefect.resource.name'] if event else '' }}",
  "resource": "{{ event.resource.id if event else '' }}",
  "event": "{{ event.event if event else '' }}",
  "occurred": "{{ event.occurred if event else '' }}"
}"""
NOTIFICATION = ("slurmctl alert {{ automation.name }}: {{ automation.description }} — job "
                "{{ event.resource['prefect.resource.name'] if event else '?' }} ({{ event.event if event else '' }})")


class AlertsError(RuntimeError):
    """The alerts cannot be installed as asked (a bad threshold, an unknown notification block)."""


@dataclass(frozen=True)
class AlertSettings:
    stall_minutes: float = 10.0
    webhook_url: str | None = None
    notify_block: str | None = None  # "<block type slug>/<block name>" of a saved notification block

    @property
    def stall(self) -> timedelta:
        return timedelta(seconds=self.stall_minutes * 60)

    def check(self) -> None:
        if self.stall.total_seconds() < MIN_STALL_S:
            raise AlertsError(f"--stall-minutes {self.stall_minutes:g} is under Prefect's minimum window for a "
                              f"proactive trigger ({MIN_STALL_S:g} s = {MIN_STALL_S / 60:.3f} min); give at least "
                              f"that")
        if self.notify_block and "/" not in self.notify_block:
            raise AlertsError(f"--notify {self.notify_block!r}: give the block as <type slug>/<name>, e.g. "
                              f"slack-webhook/ops (see `prefect block ls`)")


def _job_match() -> dict[str, str]:
    return {"prefect.resource.id": f"{ev.PREFIX}.*"}


def triggers(stall: timedelta) -> dict[str, EventTrigger]:
    """The four triggers by automation name (see the module docstring)."""
    return {
        STALLED: EventTrigger(
            match=_job_match(), for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            after={ev.PROCESSING, ev.PROGRESS},
            # processing is expected too: a retry round starting inside the previous pass's window opens its own
            expect={ev.PROCESSING, ev.PROGRESS, ev.PROCESSED, ev.COMPLETED, ev.FAILED, ev.CANCELLED}, within=stall),
        ERROR_RATE: EventTrigger(match=_job_match(), for_each={"prefect.resource.id"}, expect={ev.ERROR_RATE},
                                 posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        TOKEN_WAIT: EventTrigger(match=_job_match(), for_each={"prefect.resource.id"}, expect={ev.TOKEN_WAIT},
                                 posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        FAILED: EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": JOB_FLOW},
            for_each={"prefect.resource.id"}, expect={"prefect.flow-run.Crashed", "prefect.flow-run.Failed"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0)),
    }


def definitions(settings: AlertSettings, webhook_id: UUID | None = None,
                notify_id: UUID | None = None) -> list[AutomationCore]:
    """The automations to install, their actions calling the saved blocks."""
    actions: list[Any] = []
    if webhook_id is not None:
        actions.append(CallWebhook(block_document_id=webhook_id, payload=PAYLOAD))
    if notify_id is not None:
        actions.append(SendNotification(block_document_id=notify_id, subject="slurmctl: {{ automation.name }}",
                                        body=NOTIFICATION))
    stall = f"{settings.stall_minutes:g} min"
    return [AutomationCore(name=name, description=SUMMARIES[name].format(stall=stall), enabled=True,
                           trigger=trigger, actions=actions or [DoNothing()])
            for name, trigger in triggers(settings.stall).items()]


def installed() -> list[Any]:
    """Our automations on the current Prefect API (``slurmctl-*``), by name."""
    with get_client(sync_client=True) as client:
        return sorted((a for a in client.read_automations() if a.name.startswith(PREFIX)), key=lambda a: a.name)


def install(settings: AlertSettings) -> list[Any]:
    """Create or update the automations (and the webhook block) on the current Prefect API; return them."""
    settings.check()
    webhook_id = notify_id = None
    with get_client(sync_client=True) as client:
        if settings.notify_block:
            slug, name = settings.notify_block.split("/", 1)
            try:
                notify_id = client.read_block_document_by_name(name, block_type_slug=slug).id
            except Exception as exc:
                raise AlertsError(f"--notify {settings.notify_block}: no such block on this Prefect API "
                                  f"({type(exc).__name__}); create it first (`prefect block create {slug}`)") from None
        if settings.webhook_url:
            from prefect.blocks.webhook import Webhook

            webhook_id = Webhook(url=settings.webhook_url, method="POST",
                                 headers={"Content-Type": "application/json"}).save(WEBHOOK_BLOCK, overwrite=True)
        existing: dict[str, list[Any]] = {}
        for a in client.read_automations():
            if a.name.startswith(PREFIX):
                existing.setdefault(a.name, []).append(a)
        wanted = definitions(settings, webhook_id, notify_id)
        for automation in wanted:
            same = existing.pop(automation.name, [])
            if same:
                client.update_automation(same[0].id, automation)
                for extra in same[1:]:
                    client.delete_automation(extra.id)
            else:
                client.create_automation(automation)
        for stale in existing.values():  # ours, from an older slurmctl
            for a in stale:
                client.delete_automation(a.id)
    return installed()


def remove() -> list[str]:
    """Delete our automations; return their names."""
    names = []
    with get_client(sync_client=True) as client:
        for a in client.read_automations():
            if a.name.startswith(PREFIX):
                client.delete_automation(a.id)
                names.append(a.name)
    return sorted(names)
