"""The entry layer: the ``slurmctl`` command and the coordinator process it starts.

Only this layer, ``slurmctl.control`` and ``slurmctl.api`` under it (and Prefect, through ``prefect.yaml``) reach
into ``slurmctl.flows``; everything below them never imports a flow.
"""

from slurmctl.cli.root import main

__all__ = ["main"]
