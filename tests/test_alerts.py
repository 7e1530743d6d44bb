"""Alerts: slurmctl's own Prefect events and the automations `slurmctl alerts install` puts on a real Prefect server.

An alert is followed through the records the server leaves (``support.alerts.AlertChain``): the event it
evaluates, its ``prefect.automation.triggered``, the action's ``executed``, then the webhook's request. When each
happens is the server's business (events are written in batches every 5 s, proactive triggers are checked every
5 s: PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY), so the tests wait for each record and the timeouts are only a
safety net for a broken chain, naming the link that broke.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support.alerts import AlertChain, WebhookReceiver, job_events
from support.jobs import run_cli, status, wait_for, wait_until_ended, why, write_config, write_jsonl

from slurmctl.config import parse_config
from slurmctl.job_health import Sample, Window, crossed, error_rate_pct, token_wait_pct

# Mostly waiting on the Prefect server's automation evaluation: run beside the rest (scripts/test.sh)
pytestmark = pytest.mark.waits

STALL_S = 12  # Prefect allows 10 s at the least (given in minutes here: 10 / 60 * 60 falls just under)
CHAIN_S = 180  # safety net for each link of an alert's chain on the server (AlertChain): not a latency estimate
RECEIVED_S = 30  # from the server's record that the webhook answered to the request seen by our receiver


def make_job(tmp_path: Path, job_id: str, n: int, config: dict[str, Any] | None = None, **params: Any) -> Path:
    """``n`` items in batches of 10 on one worker thread, so a held item holds the whole job; ``config``: more job
    config fields; ``params``: the handler's (tests/support/sample_handlers.py)."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    return write_config(tmp_path / "job.yaml", job_id=job_id, handler="support.sample_handlers:counting",
                        input={"uri": "in.jsonl"}, batch_size=10, storage={"uri": "state"}, max_in_flight=2,
                        batch_retries=0, cluster={"kind": "local", "n_workers": 1},
                        errors={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "auto_retry_rounds": 0},
                        params=params, **(config or {}))


def installed_alerts() -> list[dict[str, Any]]:
    """``slurmctl alerts list --json``."""
    result = run_cli("alerts", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def webhook(prefect_api: str) -> Any:
    """The alerts installed on the test's Prefect server, calling a webhook in this process; removed afterwards
    (the server is shared by the session)."""
    with WebhookReceiver() as hook:
        result = run_cli("alerts", "install", "--webhook", f"{hook.url}/alerts", "--stall-minutes", f"{STALL_S / 60}")
        assert result.returncode == 0, result.stderr
        try:
            yield hook
        finally:
            assert run_cli("alerts", "remove").returncode == 0


# --- the threshold logic (pure) -----------------------------------------------------------------------------------

def test_error_rate_needs_enough_items_and_counts_failed_among_finished():
    assert error_rate_pct(succeeded=5, failed=4, min_items=10) is None
    assert error_rate_pct(succeeded=15, failed=5, min_items=10) == 25.0
    assert error_rate_pct(succeeded=0, failed=0, min_items=1) is None


def test_token_wait_is_a_share_of_the_worker_threads_time():
    assert token_wait_pct(waited_s=30, seconds=10, worker_threads=4) == 75.0
    assert token_wait_pct(waited_s=50, seconds=10, worker_threads=2) == 100.0  # capped
    assert token_wait_pct(waited_s=1, seconds=0, worker_threads=2) is None


def test_a_threshold_is_reported_once_per_crossing():
    above, fired = False, []
    for value in (None, 5, 12, 30, 11, 8, 15):
        above, fire = crossed(above, value, 10)
        fired.append(fire)
    assert fired == [False, False, True, False, False, False, True]


def test_the_window_judges_only_its_recent_samples():
    w = Window.of(10)
    w.add(Sample(0, succeeded=0, failed=0, waited_s=0))
    w.add(Sample(5, succeeded=0, failed=50, waited_s=10))  # a bad spell
    assert w.error_rate_pct(min_items=10) == 100.0 and w.token_wait_pct(worker_threads=2) == 100.0
    w.add(Sample(20, succeeded=100, failed=50, waited_s=10))
    w.add(Sample(30, succeeded=200, failed=50, waited_s=11))  # the last 10 s: no failures, 1 s of 20 waited
    assert w.error_rate_pct(min_items=10) == 0.0 and w.token_wait_pct(worker_threads=2) == 5.0


def test_the_coordinator_emits_one_progress_event_per_beat_and_an_error_rate_once(monkeypatch):
    from slurmctl.books.manifests import Counts
    from slurmctl.flows import events

    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(events, "emit_event", lambda event, **kw: sent.append((event, kw)))
    cfg = parse_config({"job_id": "j", "handler": "m:f", "input": {"uri": "x.jsonl"},
                        "alerts": {"error_rate_pct": 20, "min_items": 10}})
    emitter = events.JobEvents(cfg, "00000000-0000-0000-0000-000000000001")
    emitter.processing(batches=300, worker_threads=2)
    for beat in range(3):  # 100 batches a beat; from the second beat on, half their items fail
        for _ in range(100):
            emitter.batch({"items_succeeded": 10 if beat == 0 else 5, "items_failed": 0 if beat == 0 else 5})
        emitter.beat(Counts(batches_done=100 * (beat + 1)))
    emitter.beat(Counts(batches_done=300))  # nothing committed since: no progress event
    names = [e for e, _ in sent]
    assert names == ["slurmctl.job.processing", "slurmctl.job.progress", "slurmctl.job.progress",
                     "slurmctl.job.error-rate", "slurmctl.job.progress"]
    error = sent[3][1]
    assert error["resource"]["prefect.resource.id"] == "slurmctl.job.j"
    assert error["related"][0]["prefect.resource.id"] == "prefect.flow-run.00000000-0000-0000-0000-000000000001"
    assert error["payload"]["error_rate_pct"] == 25.0  # 500 failed of 2,000 finished in the window


def test_an_emitter_that_cannot_reach_prefect_warns_once_and_the_job_goes_on(monkeypatch, caplog):
    import logging

    from slurmctl.books.manifests import Counts
    from slurmctl.flows import events

    attempts = []

    def unreachable(event: str, **kw: Any) -> None:
        attempts.append(event)
        raise ConnectionError("all connection attempts failed")

    monkeypatch.setattr(events, "emit_event", unreachable)
    # Prefect's logging config may stop its loggers propagating to the root logger, where caplog listens: listen
    # on ours directly (and only there, so a record is not counted twice).
    monkeypatch.setattr(events.logger, "propagate", False)
    monkeypatch.setattr(events.logger, "handlers", [caplog.handler])
    caplog.set_level(logging.DEBUG, logger=events.logger.name)
    cfg = parse_config({"job_id": "j", "handler": "m:f", "input": {"uri": "x.jsonl"},
                        "alerts": {"error_rate_pct": 5, "min_items": 1}})
    emitter = events.JobEvents(cfg, "00000000-0000-0000-0000-000000000001")
    counts = Counts(batches_done=1, batches_total=2, items_total=20, items_succeeded=5, items_failed=5)
    try:  # every kind of emit, each failing: none may raise into the job
        emitter.started("partition")
        emitter.processing(batches=2, worker_threads=1)
        emitter.batch({"items_succeeded": 5, "items_failed": 5})
        emitter.beat(counts)  # progress, and the error rate crossing 5 %: two more events
        emitter.processed(counts)
        emitter.ended("failed", counts, error="boom")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"an emit that cannot reach Prefect raised into the job: {type(exc).__name__}: {exc}")
    assert attempts == [events.STARTED, events.PROCESSING, events.PROGRESS, events.ERROR_RATE, events.PROCESSED,
                        events.FAILED]  # each one was tried, and failed
    warnings = [r for r in caplog.records if r.name == events.logger.name and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "could not emit the job's Prefect events" in warnings[0].getMessage()
    assert "all connection attempts failed" in warnings[0].getMessage() and emitter.warned


def test_alert_thresholds_are_job_config_fields_named_when_wrong():
    cfg = parse_config({"handler": "m:f", "input": {"uri": "x.jsonl"}, "alerts": {"error_rate_pct": 5}})
    assert (cfg.alerts.error_rate_pct, cfg.alerts.token_wait_pct) == (5, 50)
    with pytest.raises(ValueError, match=r"alerts\.error_rate_pct: must be > 0"):
        parse_config({"handler": "m:f", "input": {"uri": "x.jsonl"}, "alerts": {"error_rate_pct": 0}})


def test_a_short_stall_window_or_an_unknown_block_is_refused_before_anything_is_installed(prefect_api):
    result = run_cli("alerts", "install", "--stall-minutes", "0.1")
    assert result.returncode == 2 and "at least" in result.stderr
    result = run_cli("alerts", "install", "--notify", "custom-webhook/nobody-saved-this")
    assert result.returncode == 2 and "no such block" in result.stderr
    assert installed_alerts() == []


# --- on a real Prefect server -------------------------------------------------------------------------------------

def test_a_stalled_job_calls_the_webhook_and_completes_when_released(tmp_path, webhook, prefect_api, slurmctl_home):
    # Installing again (the fixture installed them) updates ours in place: still one set of four.
    assert run_cli("alerts", "install", "--webhook", f"{webhook.url}/alerts", "--stall-minutes",
                   f"{STALL_S / 60}").returncode == 0
    installed = {a["name"]: a for a in installed_alerts()}
    assert {name: a["actions"] for name, a in installed.items()} == {
        name: ["call-webhook"] for name in ("slurmctl-job-error-rate", "slurmctl-job-failed",
                                             "slurmctl-job-stalled", "slurmctl-job-token-wait")}
    assert (installed["slurmctl-job-stalled"]["posture"], installed["slurmctl-job-stalled"]["within_s"]) == (
        "Proactive", STALL_S)

    # Eight batches of 0.4 s (a few heartbeats of progress); the seventh holds inside its handler (item 65) until
    # the test lets it go.
    marker, release = tmp_path / "held", tmp_path / "release"
    cfg = make_job(tmp_path, "stalls", 80, sleep_s=0.04, hold={"id": 65, "marker": str(marker),
                                                              "release": str(release)})
    assert run_cli("submit", str(cfg)).returncode == 0
    try:
        wait_for(marker.exists, 240, "the job to hold in its seventh batch")
        held_at = time.time()
        # The alert for this stall: a window after the last commit (made just before the hold). On a machine so
        # busy that the first commit came more than a window after the pass started, that was a stall too, and its
        # alert came earlier: it does not count here.
        chain = AlertChain(prefect_api, "slurmctl-job-stalled", "slurmctl.job.stalls")
        chain.acted(chain.fired(STALL_S + CHAIN_S, after=held_at), CHAIN_S)
        alert = wait_for(lambda: [a for a in webhook.find(alert="slurmctl-job-stalled", job_id="stalls")
                                  if a["received"] > held_at], RECEIVED_S, f"the stall alert (window {STALL_S} s)")[0]
        assert alert["received"] - held_at >= STALL_S - 2, alert
        assert alert["resource"] == "slurmctl.job.stalls" and alert["summary"].startswith("no batch committed")
        assert status("stalls")["status"] == "running"
    finally:
        release.touch()
    view = wait_until_ended("stalls")
    assert view["status"] == "completed", why(slurmctl_home, "stalls")
    names = wait_for(lambda: "slurmctl.job.completed" in (n := [e["event"] for e in job_events(
        prefect_api, "stalls")]) and n, CHAIN_S, "the job's completed event")
    assert names[0] == "slurmctl.job.started" and names[-1] == "slurmctl.job.completed"
    assert {"slurmctl.job.processing", "slurmctl.job.progress", "slurmctl.job.processed"} <= set(names)
    progress = [e for e in job_events(prefect_api, "stalls", "slurmctl.job.progress")]
    assert sum(e["payload"]["committed"] for e in progress) == 8
    assert progress[-1]["payload"]["counts"]["batches_done"] == 8
    assert progress[0]["related"][0]["prefect.resource.id"] == f"prefect.flow-run.{view['flow_run_id']}"


def test_a_failed_job_run_calls_the_webhook(tmp_path, webhook, prefect_api, slurmctl_home):
    # The worker dies inside the first batch and the job may not re-queue it: the batch fails, so does the run.
    marker = tmp_path / "held"
    cfg = make_job(tmp_path, "fails", 20, hold={"id": 3, "marker": str(marker), "release": str(tmp_path / "never")},
                   config={"worker_loss_requeues": 0})
    assert run_cli("submit", str(cfg)).returncode == 0
    pid = int(wait_for(lambda: marker.exists() and marker.read_text().strip(), 240, "the worker to hold"))
    os.kill(pid, signal.SIGKILL)
    view = wait_until_ended("fails")
    assert view["status"] == "failed"
    failure = json.loads(next((tmp_path / "state" / "jobs" / "fails" / "tasks").glob("*.failed.json")).read_text())
    cause = " ".join(failure["error"].split())[:40]
    assert f"The first failed with {cause}" in view["error"], view["error"]  # why, not only which batches
    chain = AlertChain(prefect_api, "slurmctl-job-failed", f"prefect.flow-run.{view['flow_run_id']}")
    chain.evaluated_event(["prefect.flow-run.Failed", "prefect.flow-run.Crashed"], CHAIN_S)
    chain.acted(chain.fired(CHAIN_S), CHAIN_S)
    alert = wait_for(lambda: webhook.find(alert="slurmctl-job-failed", job_id="fails"), RECEIVED_S,
                     "the failed-run alert")[-1]
    assert alert["event"] == "prefect.flow-run.Failed" and alert["resource"].startswith("prefect.flow-run.")


def test_a_job_failing_items_emits_its_error_rate_once(tmp_path, webhook, prefect_api, slurmctl_home):
    # 40 items, a third of them fail (not_found: not retried); the job's threshold is 20 %.
    fail = {str(i): "not_found" for i in range(0, 40, 3)}
    cfg = make_job(tmp_path, "erring", 40, fail=fail, config={"alerts": {"error_rate_pct": 20, "min_items": 10}})
    assert run_cli("submit", str(cfg), "--wait").returncode == 0, why(slurmctl_home, "erring")
    events = wait_for(lambda: job_events(prefect_api, "erring", "slurmctl.job.error-rate"), CHAIN_S,
                      "the job's error-rate event")
    assert len(events) == 1
    assert events[0]["payload"]["error_rate_pct"] > 20 and events[0]["payload"]["threshold_pct"] == 20
    chain = AlertChain(prefect_api, "slurmctl-job-error-rate", "slurmctl.job.erring")
    chain.acted(chain.fired(CHAIN_S), CHAIN_S)
    alert = wait_for(lambda: webhook.find(alert="slurmctl-job-error-rate", job_id="erring"), RECEIVED_S,
                     "the error-rate alert")[-1]
    assert alert["event"] == "slurmctl.job.error-rate"
    assert job_events(prefect_api, "erring", "slurmctl.job.token-wait") == []  # no rate limit, no wait
