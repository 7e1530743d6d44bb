"""Processes for the coordinator's own CPU-bound work (the aggregation's merges), forked from the workers' template.

A merge spends Python on every file it reads (a 100-row part: ~0.5 ms of CPU to open, verify and decode, most of
it holding the GIL), so two threads of one process are no faster than one: the 100 first-level merges of a
10,000-part job took 2.9-3.2 s in two threads of a coordinator, 2.2 s in one, and 1.3 s in two processes. A
coordinator of a job on the embedded default has a template to fork processes from (``flows/local_workers.py``:
multiprocessing's forkserver, Prefect, Dask and pyarrow imported), so a process costs it milliseconds; the callers
use this module only there, and keep their threads elsewhere (a notebook or a test calling a flow has no template,
and a fresh interpreter per process would cost seconds).

Plain functions and picklable arguments only: what runs here gets no Prefect context (the task run that called it
stays in the coordinator and reports it).
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

_pool: ProcessPoolExecutor | None = None
_lock = threading.Lock()


def _get(workers: int) -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=max(1, workers), initializer=_warm,
                                        mp_context=multiprocessing.get_context("forkserver"))
        return _pool


def _warm() -> None:
    """A new process's first Parquet write and read (its codecs and reader set up): otherwise its first merge takes
    ~20-60 ms longer than the next."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1]}), sink, compression="zstd")
    pq.ParquetFile(pa.BufferReader(sink.getvalue())).read(use_threads=False)


def start(workers: int) -> None:
    """Start the pool's ``workers`` processes now, in the background (each forked, then ``_warm``), so that they are
    ready when the work comes; the caller goes on meanwhile."""
    pool = _get(workers)
    for _ in range(max(1, workers)):
        pool.submit(int)  # the pool starts a process per task queued while none is idle


def starmap(workers: int, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
    """``[fn(*args) for args in calls]``, queued at once to the pool of ``workers`` processes (started with the
    first call), so its processes stay busy while the caller's task runs change; the first exception is raised
    here. A pool that lost a process (killed: out of memory) is dropped, so a retry of the caller gets a new one."""
    pool = _get(workers)
    futures = []
    try:
        futures = [pool.submit(fn, *args) for args in calls]
        return [f.result() for f in futures]
    except BrokenProcessPool:
        _drop(pool)
        raise
    finally:
        for f in futures:
            f.cancel()  # after a failure: what has not started yet is not run


def _drop(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown() -> None:
    """Stop the pool's processes (the work that needed them is over); the next ``starmap`` starts a new pool."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
