"""dask-jobqueue's SLURMCluster as slurmctl starts it (``flows/runners.py`` imports it when a job runs on Slurm).

Its own module because importing ``dask_jobqueue`` installs a SIGINT handler (``dask_jobqueue.runner`` calls
``signal.signal`` at import), which raises ``ValueError`` anywhere but the main thread: a deployment worker loads the
job flow in a worker thread to run its ``on_cancellation`` hook, and an import of dask_jobqueue on the way made that
load fail, so the hook never ran. Nothing the flow module imports may import this one at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from dask_jobqueue import SLURMCluster

from slurmctl.secret_env import remove_env_file, write_env_file


class SecretEnvSLURMCluster(SLURMCluster):
    """dask-jobqueue's SLURMCluster that writes the forwarded secret variables to ``secrets_file`` (0600) as it
    starts, for its job scripts to source, and removes the file when it closes: the secrets are on disk exactly as
    long as a worker job may start. Values are read from this (the coordinator's) environment, never passed in."""

    def __init__(self, *args: Any, secrets_file: str | None = None, secret_names: Sequence[str] = (),
                 **kwargs: Any) -> None:
        self._secrets_file = Path(secrets_file) if secrets_file and secret_names else None
        if self._secrets_file is not None:
            write_env_file(self._secrets_file, {k: os.environ[k] for k in secret_names if k in os.environ})
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._remove_secrets()
            raise

    def _remove_secrets(self) -> None:
        if self._secrets_file is not None:
            remove_env_file(self._secrets_file)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().close(*args, **kwargs)
        finally:
            self._remove_secrets()
