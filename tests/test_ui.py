"""The job in the Prefect UI, as a browser shows it: headless Chromium renders the job's flow run page and its
progress artifact's page from the test server's UI, and the test reads the rendered DOM. Screenshots of both pages
are saved under the test's tmp_path (their paths are printed and recorded as the ``screenshots`` property)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from support.browser import RenderedPage
from support.jobs import log_tail, run_cli, status, write_config, write_jsonl
from support.prefect_runs import job_artifacts

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def ui_shows(what: Callable[[RenderedPage], bool]) -> Callable[[RenderedPage], bool]:
    """``what``, for ``wait_for_page``; a page that cannot reach the API fails at once (no point waiting)."""

    def check(page: RenderedPage) -> bool:
        assert "Can't connect to Server API" not in page.text, (
            f"the UI cannot reach the server's API (server started without PREFECT_UI_API_URL?): {page.text[:300]}")
        return what(page)

    return check


def test_job_flow_run_page_shows_job_id_and_progress(tmp_path: Path, chromium, prefect_api: str, prefect_ui: str,
                                                     slurmctl_home: Path, record_property):
    write_jsonl(tmp_path / "items.jsonl", [{"id": i} for i in range(50)])
    cfg = write_config(tmp_path / "job.yaml", job_id="ui-browser", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "items.jsonl"}, batch_size=10, cluster={"kind": "local", "n_workers": 1},
                       storage={"uri": "state"})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "ui-browser")
    run_id = status("ui-browser")["flow_run_id"]

    # The flow run's page: the run is called by the job id (the breadcrumb "Runs / ui-browser"), and it completed.
    # (Each page is rendered again until the app has loaded what it shows, then read once.)
    run_png = tmp_path / "flow-run.png"
    run_page = chromium.wait_for_page(f"{prefect_ui}/runs/flow-run/{run_id}",
                                      ui_shows(lambda p: len(p.texts("p-bread-crumbs__crumb")) == 2), 180,
                                      "the run's name after 'Runs'", screenshot=run_png)
    assert run_page.texts("p-bread-crumbs__crumb") == ["Runs", "ui-browser"], run_page.text
    assert run_page.title == "Flow Run: ui-browser • Prefect Server"
    assert "ui-browser Completed" in run_page.text  # the state badge beside the name

    # The progress artifact's page (where the run's Artifacts tab links): its key, the share of batches done, the
    # one-line state, and the flow run it belongs to, by name.
    progress = job_artifacts(prefect_api, run_id)["ui-browser-progress"]
    art_png = tmp_path / "progress-artifact.png"

    def loaded(p: RenderedPage) -> bool:
        return bool(p.texts("artifact-data-progress")) and "Flow Run" in dict(p.key_values())

    art_page = chromium.wait_for_page(f"{prefect_ui}/artifacts/artifact/{progress.id}", ui_shows(loaded), 180,
                                      "the artifact's value and its flow run", screenshot=art_png)
    assert art_page.texts("artifact-data-progress") == ["Progress: 100%"], art_page.text
    details = dict(art_page.key_values())
    assert details["Key"] == "ui-browser-progress" and details["Type"] == "progress"
    assert details["Flow Run"] == "ui-browser"
    assert (f"/runs/flow-run/{run_id}", "ui-browser") in art_page.links()
    [description] = art_page.texts("artifact-description")
    assert description.startswith("ui-browser: done, 5 of 5 batches, 50 of 50 items")

    for png in (run_png, art_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
        print(f"screenshot: {png}")
    record_property("screenshots", [str(run_png), str(art_png)])
