"""The entry layer: the ``slurmctl`` command and the coordinator process it starts.

Only this layer (and Prefect, through ``prefect.yaml``) reaches into ``slurmctl.flows``; everything below it never
imports a flow.
"""

from slurmctl.cli.commands import main

__all__ = ["main"]
