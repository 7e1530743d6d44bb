#!/usr/bin/env bash
# README command 2: set up .venv, start the real single-node Slurm (if it is not running), run the test suite, and
# stop what this script started. Extra arguments go to pytest (e.g. -m "not slurm", -k name).
#
# Slurm needs root (apt-get, daemons): scripts/slurm.sh uses `sudo -n` when not run as root. If Slurm cannot be
# started, the Slurm tests are skipped with a loud warning here and in pytest's summary -- unless
# SLURMCTL_REQUIRE_SLURM=1 (CI sets it: .ci/run), where this script fails before running any test.
# SLURMCTL_SKIP_SLURM=1: do not try to start Slurm (a developer's choice; refused when Slurm is required).
set -euo pipefail
cd "$(dirname "$0")/.."

require_slurm=${SLURMCTL_REQUIRE_SLURM:-0}
started_slurm=0
slurm_missing=""  # why the Slurm tests will skip, if they will

warn_slurm_missing() {
  cat >&2 <<EOF

test: ##########################################################################################
test: WARNING: $slurm_missing
test: The Slurm tests (-m slurm) will be SKIPPED (pytest lists them under "short test summary").
test: Start Slurm with \`sudo bash scripts/slurm.sh up\`, or run as root; CI (.ci/run) fails instead.
test: ##########################################################################################

EOF
}

cleanup() { if [ "$started_slurm" = 1 ]; then bash scripts/slurm.sh down || true; fi; }
trap cleanup EXIT

# Slurm first: in CI a missing Slurm fails the run before minutes of installing Python packages.
if bash scripts/slurm.sh status >/dev/null 2>&1; then
  :  # running (not ours: left alone)
elif [ "${SLURMCTL_SKIP_SLURM:-0}" = 1 ]; then
  if [ "$require_slurm" = 1 ]; then
    echo "test: ERROR: SLURMCTL_SKIP_SLURM=1 and SLURMCTL_REQUIRE_SLURM=1 (CI) contradict each other" >&2
    exit 1
  fi
  slurm_missing="Slurm is not running, and SLURMCTL_SKIP_SLURM=1 said not to start it."
elif bash scripts/slurm.sh up; then
  started_slurm=1
elif [ "$require_slurm" = 1 ]; then
  echo "test: ERROR: Slurm could not be started (scripts/slurm.sh up failed: see above), and" \
       "SLURMCTL_REQUIRE_SLURM=1 (CI) requires it: not running the tests" >&2
  exit 1
else
  slurm_missing='Slurm could not be started: `scripts/slurm.sh up` failed (its error is at the top of this output).'
fi
if [ -n "$slurm_missing" ]; then
  warn_slurm_missing
else
  # Slurm is up: a Slurm test that finds it gone later fails instead of skipping.
  export SLURMCTL_REQUIRE_SLURM=1
fi
bash scripts/setup.sh

export PREFECT_SERVER_ANALYTICS_ENABLED=false
# Tests start their own Prefect and moto servers; never talk to a developer's configured Prefect server.
unset PREFECT_API_URL PREFECT_API_KEY
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
rc=0
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@" || rc=$?
if [ -n "$slurm_missing" ]; then
  warn_slurm_missing  # again, after pytest's output, where it is seen
fi
exit "$rc"
