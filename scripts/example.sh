#!/usr/bin/env bash
# README command 1: set up .venv and run the example job on the embedded default (LocalCluster, local store).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/python examples/echo/make_input.py "${EXAMPLE_ITEMS:-10000}" >/dev/null
job_id="example-$(date -u +%Y%m%d-%H%M%S)"
.venv/bin/slurmctl submit examples/echo/config.yaml --job-id "$job_id" --wait
.venv/bin/slurmctl status "$job_id"
