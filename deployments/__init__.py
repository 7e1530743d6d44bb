"""Prefect deployments of the job flow.

The declarative definitions are in ``prefect.yaml`` at the repository root (``prefect deploy --all``). Scheduled,
date-templated backfills and automations are added here as the Prefect-operations work lands.
"""
