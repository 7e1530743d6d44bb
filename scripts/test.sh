#!/usr/bin/env bash
# README command 2: set up .venv, start the real single-node Slurm (if it is not running), run the test suite, and
# stop what this script started. Extra arguments go to pytest (e.g. -m "not slurm", -k name); without any, the Slurm
# tests and those that wait on outside clocks run beside the others (see below).
#
# Slurm needs root (apt-get, daemons): scripts/slurm.sh uses `sudo -n` when not run as root. If Slurm cannot be
# started, the Slurm tests are skipped with a loud warning here and in pytest's summary -- unless
# SLURMCTL_REQUIRE_SLURM=1 (CI sets it: .ci/run), where this script fails before running any test.
# SLURMCTL_SKIP_SLURM=1: do not try to start Slurm (a developer's choice; refused when Slurm is required).
#
# The browser test (tests/test_ui.py) drives headless Chromium: scripts/browser.sh installs Debian's chromium when
# it is missing (root or `sudo -n`, as for Slurm). If it cannot, that test is skipped with a loud warning -- unless
# SLURMCTL_REQUIRE_BROWSER=1 (CI sets it), where this script fails before running any test.
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

# The Python environment installs (pip, network-bound) while Slurm and Chromium install (apt) and start: on a fresh
# machine that is a minute or two saved. Its output is shown once it is done; a Slurm failure stops it.
setup_log=$(mktemp)
bash scripts/setup.sh >"$setup_log" 2>&1 &
setup_pid=$!

cleanup() {
  kill "$setup_pid" ${slurm_pid:-} 2>/dev/null || true
  if [ "$started_slurm" = 1 ]; then bash scripts/slurm.sh down || true; fi
  rm -f "$setup_log"
}
trap cleanup EXIT

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

# Chromium, for the browser test: same rule as Slurm (CI fails, a developer gets a warning and a skipped test).
browser_missing=""
warn_browser_missing() {
  cat >&2 <<EOF

test: ##########################################################################################
test: WARNING: Chromium could not be installed (\`scripts/browser.sh up\` failed: its error is above).
test: The browser test (tests/test_ui.py) will be SKIPPED. Run \`sudo bash scripts/browser.sh up\`, or run as
test: root; CI (.ci/run, SLURMCTL_REQUIRE_BROWSER=1) fails instead.
test: ##########################################################################################

EOF
}
if bash scripts/browser.sh up >/dev/null; then
  export SLURMCTL_REQUIRE_BROWSER=1  # installed: a browser test that cannot find it later fails instead of skipping
elif [ "${SLURMCTL_REQUIRE_BROWSER:-0}" = 1 ]; then
  echo "test: ERROR: Chromium could not be installed (scripts/browser.sh up failed: see above), and" \
       "SLURMCTL_REQUIRE_BROWSER=1 (CI) requires it for the browser test: not running the tests" >&2
  exit 1
else
  browser_missing=1
  warn_browser_missing
fi
setup_rc=0
wait "$setup_pid" || setup_rc=$?
cat "$setup_log" >&2
if [ "$setup_rc" != 0 ]; then
  echo "test: ERROR: scripts/setup.sh failed (its output is above)" >&2
  exit "$setup_rc"
fi

export PREFECT_SERVER_ANALYTICS_ENABLED=false
# Tests start their own Prefect and moto servers; never talk to a developer's configured Prefect server.
unset PREFECT_API_URL PREFECT_API_KEY
# Nor start Prefect's temporary server: a test that talks to Prefect outside its server's settings fails, where it
# used to start one of its own (12.6 s) and leave a "Logging error" traceback at the end of the run.
export PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
pytest_cmd=(.venv/bin/python -m pytest -p no:cacheprovider -ra --durations=0 --durations-min=8)
rc=0
if [ $# = 0 ] && [ -z "$slurm_missing" ] && [ "${SLURMCTL_TEST_STREAMS:-2}" = 2 ]; then
  # The whole suite, in two streams at once: the tests that mostly wait on a clock outside them (-m "slurm or
  # waits": Slurm's walltimes, signals and job starts; Prefect's scheduler, workers and automations; ~9 min, a
  # fraction of a core) beside everything else, instead of after it. Each stream has its own Prefect and moto
  # servers (session fixtures) and its own temporary directory; the waiting stream's output is shown when it ends.
  # SLURMCTL_TEST_STREAMS=1 runs one stream, as any run with arguments does.
  #
  # Once its tests are done, that stream runs the version matrix (scripts/matrix.sh: the unit tests and one embedded
  # job on Python 3.10 with the lowest direct dependencies and on Python 3.13 with the newest, ~6 min of one busy
  # process, one bound after the other so the suite keeps a core), while the other stream is still running.
  # SLURMCTL_MATRIX=0 leaves it out.
  streams=$(mktemp -d)
  slurm_rc=0
  {
    waits_rc=0
    "${pytest_cmd[@]}" --basetemp="$streams/waits" -m "slurm or waits" || waits_rc=$?
    if [ "${SLURMCTL_MATRIX:-1}" = 1 ]; then
      echo
      echo "test: ---- the version matrix (scripts/matrix.sh) ----"
      SLURMCTL_MATRIX_PARALLEL=0 bash scripts/matrix.sh || { [ "$waits_rc" != 0 ] || waits_rc=1; }
    fi
    exit "$waits_rc"
  } >"$streams/waits.log" 2>&1 &
  slurm_pid=$!
  "${pytest_cmd[@]}" --basetemp="$streams/rest" -m "not slurm and not waits" || rc=$?
  wait "$slurm_pid" || slurm_rc=$?
  echo
  echo "test: ---- the tests that wait on outside clocks (-m \"slurm or waits\") and the version matrix, run beside" \
       "the others ----"
  cat "$streams/waits.log"
  rm -rf "$streams"
  if [ "$slurm_rc" != 0 ]; then
    echo "test: the Slurm and waiting tests or the version matrix failed (exit $slurm_rc): their output is above" >&2
    [ "$rc" != 0 ] || rc=$slurm_rc
  fi
else
  "${pytest_cmd[@]}" "$@" || rc=$?
fi
if [ -n "$slurm_missing" ]; then
  warn_slurm_missing  # again, after pytest's output, where it is seen
fi
if [ -n "$browser_missing" ]; then
  warn_browser_missing
fi
exit "$rc"
