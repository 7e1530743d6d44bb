#!/usr/bin/env bash
# Compile slurmctl's own modules and the tests' (a test job's workers import its handlers from tests/support) to
# bytecode for the Python given (default .venv/bin/python; each Python keeps its own files in __pycache__). Where the
# environment sets PYTHONDONTWRITEBYTECODE (this machine's does), Python never caches what it compiles, and every CLI
# call, coordinator and worker compiled them again (~0.15 s of CPU each). A source edited later is compiled in memory
# as before: its cached file no longer matches it. Called by scripts/setup.sh and scripts/matrix.sh. A speed-up only:
# never a failure.
cd "$(dirname "$0")/.."
"${1:-.venv/bin/python}" -m compileall -q slurmctl flows tasks blocks handlers deployments tests benchmarks \
  examples >/dev/null 2>&1 || true
