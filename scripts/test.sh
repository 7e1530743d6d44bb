#!/usr/bin/env bash
# README command 2: set up .venv, start the real single-node Slurm (if we can and it is not running), run the
# test suite, and stop what this script started. Extra arguments go to pytest (e.g. -m "not slurm", -k name).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

started_slurm=0
if [ "$(id -u)" = 0 ] && [ "${SLURMCTL_SKIP_SLURM:-0}" != 1 ]; then
  if ! bash scripts/slurm.sh status >/dev/null 2>&1; then
    bash scripts/slurm.sh up
    started_slurm=1
  fi
  export SLURMCTL_REQUIRE_SLURM=${SLURMCTL_REQUIRE_SLURM:-1}
fi
cleanup() { if [ "$started_slurm" = 1 ]; then bash scripts/slurm.sh down || true; fi; }
trap cleanup EXIT

export PREFECT_SERVER_ANALYTICS_ENABLED=false
# Tests start their own Prefect and moto servers; never talk to a developer's configured Prefect server.
unset PREFECT_API_URL PREFECT_API_KEY
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
