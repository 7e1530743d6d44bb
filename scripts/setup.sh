#!/usr/bin/env bash
# Create .venv in the repo root and install slurmctl with its pinned dependencies (idempotent, fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.slurmctl-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing slurmctl and pinned dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]' >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2
    echo "setup: pip install failed (full log above)" >&2
    exit 1
  fi
  rm -f "$log"
  .venv/bin/python -c "import prefect, prefect_aws, prefect_dask, dask_jobqueue, moto, pyarrow, slurmctl.flows.job"
  echo "$want" > "$stamp"
fi
bash scripts/compile.sh .venv/bin/python
