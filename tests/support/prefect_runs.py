"""What the Prefect server recorded about a job's runs, read through the Prefect client (a real server's API)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator
from uuid import UUID


@contextlib.contextmanager
def flows_reporting_to(api_url: str) -> Iterator[None]:
    """Run flows in this (test) process against the test's Prefect server. On the way out, Prefect's log and event
    workers send what they still hold, so nothing is left for them to retry after the server stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            yield
        finally:
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)


def _with_api(api_url: str, coro_fn: Any) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(coro_fn())


def task_runs_of(api_url: str, flow_run_ids: set[str]) -> list[Any]:
    """Every task run recorded for the given flow runs (paged)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[Any]:
        async with get_client() as client:
            runs, offset = [], 0
            while True:
                page = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in flow_run_ids])),
                    offset=offset, limit=200)
                runs += page
                offset += len(page)
                if len(page) < 200:
                    return runs

    return _with_api(api_url, read)


def settled_task_runs(api_url: str, flow_run_ids: set[str], count: int, timeout: float = 60) -> list[Any]:
    """The flow runs' task runs once ``count`` of them are recorded in a final state. The server records task-run
    states from the events the client sends, after the flow has returned: read too early, a run still shows its
    first state (or its default name)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        runs = task_runs_of(api_url, flow_run_ids)
        if (len(runs) >= count and all(r.state is not None and r.state.is_final() for r in runs)) \
                or time.monotonic() >= deadline:
            return runs
        time.sleep(0.2)


def flow_run_state(api_url: str, flow_run_id: str) -> str:
    """The flow run's state type, e.g. ``"COMPLETED"``, ``"FAILED"``, ``"RUNNING"``."""
    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            return (await client.read_flow_run(UUID(flow_run_id))).state.type.value

    return _with_api(api_url, read)


def flow_run_final_state(api_url: str, flow_run_id: str) -> tuple[str, str, str]:
    """The flow run's state as the UI shows it: its type, its name and its message, e.g. ``("CANCELLED", "Paused",
    "j paused: budget max_api_calls ...")``."""
    from prefect.client.orchestration import get_client

    async def read() -> tuple[str, str, str]:
        async with get_client() as client:
            state = (await client.read_flow_run(UUID(flow_run_id))).state
            return state.type.value, state.name, state.message or ""

    return _with_api(api_url, read)


def job_flow_run_names(api_url: str, flow_run_id: str) -> list[str]:
    """The names of a job's flow run and of its subflow runs (in start order)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    async def read() -> list[str]:
        async with get_client() as client:
            parent = await client.read_flow_run(UUID(flow_run_id))
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])),
                sort=FlowRunSort.START_TIME_ASC)
            return [parent.name] + [c.name for c in children]

    return _with_api(api_url, read)


def job_flow_run_states(api_url: str, flow_run_id: str) -> dict[str, str]:
    """State type by run name of a job's flow run and its subflow runs, e.g. ``{"j": "CANCELLED", "j / process":
    "CANCELLED", "j / partition": "COMPLETED"}``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def read() -> dict[str, str]:
        async with get_client() as client:
            parent = await client.read_flow_run(UUID(flow_run_id))
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
            return {r.name: r.state.type.value for r in [parent, *children]}

    return _with_api(api_url, read)


def task_run_state(api_url: str, task_run_id: str, missing_ok: bool = False) -> str | None:
    """The task run's state type, e.g. ``"CRASHED"``. ``missing_ok``: None while Prefect has not recorded the run (a
    worker's task runs exist in Prefect once its events have reached the server and been processed)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def read() -> str | None:
        async with get_client() as client:
            try:
                return (await client.read_task_run(UUID(str(task_run_id)))).state.type.value
            except ObjectNotFound:
                if missing_ok:
                    return None
                raise

    return _with_api(api_url, read)


def job_task_run_states(api_url: str, flow_run_id: str) -> list[str]:
    """The state types of every task run of a job's flow run and its subflow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def children() -> set[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[
                    UUID(flow_run_id)])))
            return {str(r.id) for r in runs}

    ids = _with_api(api_url, children) | {flow_run_id}
    return [r.state.type.value for r in task_runs_of(api_url, ids) if r.state is not None]


def cancel_flow_run(api_url: str, flow_run_id: str) -> None:
    """What the Prefect UI's Cancel button (and ``prefect flow-run cancel``) does: the run goes Cancelling."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    async def cancel() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(UUID(flow_run_id), Cancelling())

    _with_api(api_url, cancel)


def job_artifacts(api_url: str, flow_run_id: str) -> dict[str, Any]:
    """The artifacts of a flow run by key (each as the API returns it now: ``data``, ``description``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, Any]:
        async with get_client() as client:
            found = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
            return {a.key: a for a in found if a.key}

    return _with_api(api_url, read)


def registered_block_types(api_url: str, slugs: list[str]) -> list[str]:
    """Which of ``slugs`` the server knows as block types."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def read() -> list[str]:
        found = []
        async with get_client() as client:
            for slug in slugs:
                with contextlib.suppress(ObjectNotFound):
                    found.append((await client.read_block_type_by_slug(slug)).slug)
        return found

    return _with_api(api_url, read)
