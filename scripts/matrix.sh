#!/usr/bin/env bash
# The two ends of the supported range (pyproject.toml: requires-python and the dependency ranges), each in a venv of
# its own outside the repo's .venv, with the unit tests and one embedded end-to-end job run there:
#   lowest  Python 3.10 with the LOWEST versions of the direct dependencies (uv --resolution lowest-direct)
#   newest  Python 3.13 with the newest versions that resolve
# `bash scripts/matrix.sh` runs both; `bash scripts/matrix.sh lowest` (or newest) one. Each bound prints the versions
# of the direct dependencies it installed, so a reader sees what was tested. Exits non-zero if any bound failed.
#
# The venvs live under ${SLURMCTL_MATRIX_DIR:-/tmp/slurmctl-matrix} (py310-lowest, py313-newest) and are reused
# while their inputs (pyproject.toml, this script, the Python, the repo's path) are unchanged, as scripts/setup.sh's
# stamp does; SLURMCTL_MATRIX_REFRESH=1 rebuilds them (picking up newer releases for `newest`). uv itself is
# installed from PyPI into a venv of its own there. slurmctl is installed editable, so the code under test is the
# work tree's. The Pythons: SLURMCTL_PY310 / SLURMCTL_PY313 (default: pyenv's 3.10.13 and 3.13.0).
#
# The venvs' packages are compiled to bytecode as they are installed (uv does not by default; pip does). Where the
# environment sets PYTHONDONTWRITEBYTECODE (this machine's does), Python never caches what it compiled, so every
# process of the matrix compiled Prefect, Dask and pyarrow again: `import prefect, distributed` took 3.8 s instead of
# 1.9 s, the end-to-end job 46 s instead of 34 s.
#
# requirements.lock is NOT used here (it is the exact set for Python 3.11 that scripts/setup.sh installs into .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dir=${SLURMCTL_MATRIX_DIR:-/tmp/slurmctl-matrix}
uv_version=0.13.8
py310=${SLURMCTL_PY310:-/root/.pyenv/versions/3.10.13/bin/python}
py313=${SLURMCTL_PY313:-/root/.pyenv/versions/3.13.0/bin/python}
unit=(-m "not integration")
e2e=(tests/test_embedded.py::test_echo_job_end_to_end)

bounds=("$@")
[ ${#bounds[@]} -gt 0 ] || bounds=(lowest newest)
for b in "${bounds[@]}"; do
  case "$b" in lowest|newest) ;; *) echo "matrix: unknown bound '$b' (lowest, newest)" >&2; exit 2 ;; esac
done

mkdir -p "$dir"
export UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
# uv, pinned, in a venv of its own (any Python 3 will do to run it).
uv="$dir/uv/bin/uv"
if [ ! -x "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$uv_version" ]; then
  echo "matrix: installing uv $uv_version into $dir/uv" >&2
  rm -rf "$dir/uv"
  python3 -m venv "$dir/uv"
  "$dir/uv/bin/python" -m pip install -q --disable-pip-version-check "uv==$uv_version"
fi

# The direct dependencies' installed versions, as `name==version` (the venv's own slurmctl metadata names them).
direct_versions() {
  "$1" - <<'EOF'
import re
from importlib.metadata import PackageNotFoundError, requires, version

names = []
for req in requires("slurmctl") or []:
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    if name.lower() not in {n.lower() for n in names}:
        names.append(name)
for name in names:
    try:
        print(f"  {name}=={version(name)}")
    except PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
}

setup_bound() {  # name python resolution
  local name=$1 py=$2 resolution=$3 venv="$dir/$1"
  if [ ! -x "$py" ]; then
    echo "matrix: $name: no Python at $py" >&2
    return 1
  fi
  local want
  want=$( { cat pyproject.toml scripts/matrix.sh; echo "$root $resolution $uv_version"; "$py" -VV; } | sha256sum | cut -d' ' -f1)
  if [ "${SLURMCTL_MATRIX_REFRESH:-0}" != 1 ] && [ -f "$venv/.slurmctl-matrix" ] \
      && [ "$(cat "$venv/.slurmctl-matrix")" = "$want" ]; then
    echo "matrix: $name: reusing $venv (inputs unchanged)"
    return 0
  fi
  echo "matrix: $name: creating $venv ($("$py" -V), --resolution $resolution)"
  # (called where `set -e` does not apply: each step checked)
  rm -rf "$venv" &&
    "$uv" venv -q --seed --python "$py" "$venv" &&
    "$uv" pip install -q --compile-bytecode --python "$venv/bin/python" --resolution "$resolution" -e "$root[test]" &&
    "$venv/bin/python" -c "import prefect, prefect_aws, prefect_dask, dask_jobqueue, moto, pyarrow, slurmctl.flows.job" &&
    echo "$want" > "$venv/.slurmctl-matrix" || { echo "matrix: $name: setting up $venv failed" >&2; return 1; }
}

run_bound() {  # name python resolution
  local name=$1 venv="$dir/$1" t0=$SECONDS rc=0
  setup_bound "$@" || return 1
  echo "matrix: $name: $("$venv/bin/python" -V), direct dependencies installed:"
  direct_versions "$venv/bin/python"
  bash "$root/scripts/compile.sh" "$venv/bin/python"  # the work tree's modules, for this Python
  local t1=$SECONDS home
  # As scripts/test.sh: no telemetry, never a developer's configured Prefect server, a Prefect home of its own.
  home=$(mktemp -d)
  mkdir -p "$dir/tmp-$name"
  local pytest=(env -u PREFECT_API_URL -u PREFECT_API_KEY PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$home"
                "$venv/bin/python" -m pytest -p no:cacheprovider -q)
  local unit_rc=0 e2e_rc=0
  echo "matrix: $name: unit tests (-m \"not integration\")"
  "${pytest[@]}" --basetemp="$dir/tmp-$name/unit" "${unit[@]}" || unit_rc=$?
  local t2=$SECONDS
  echo "matrix: $name: embedded end-to-end job (${e2e[*]})"
  "${pytest[@]}" --basetemp="$dir/tmp-$name/e2e" "${e2e[@]}" || e2e_rc=$?
  rm -rf "$home" "$dir/tmp-$name"
  echo "matrix: $name: unit tests $(verdict $unit_rc), end-to-end job $(verdict $e2e_rc)" \
       "(setup $((t1 - t0)) s, unit tests $((t2 - t1)) s, end-to-end $((SECONDS - t2)) s)"
  [ $unit_rc = 0 ] && [ $e2e_rc = 0 ]
}

verdict() { if [ "$1" = 0 ]; then echo passed; else echo "FAILED (pytest exit $1)"; fi; }

bound_args() {
  case "$1" in
    lowest) echo "py310-lowest $py310 lowest-direct" ;;
    newest) echo "py313-newest $py313 highest" ;;
  esac
}

failed=()
if [ "${SLURMCTL_MATRIX_PARALLEL:-1}" = 1 ] && [ ${#bounds[@]} -gt 1 ]; then
  # The bounds at once (each test run is mostly one busy process: on 2 cores this about halves the wall time); each
  # one's output is shown, in order, once it ends. SLURMCTL_MATRIX_PARALLEL=0 runs them one after the other.
  echo "matrix: running ${bounds[*]} at once; each one's output follows when it ends"
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
  for b in "${bounds[@]}"; do
    # shellcheck disable=SC2046
    run_bound $(bound_args "$b") >"$dir/$b.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!bounds[@]}"; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    cat "$dir/${bounds[$i]}.log"
    rm -f "$dir/${bounds[$i]}.log"
    [ "$rc" = 0 ] || failed+=("${bounds[$i]}")
  done
  trap - EXIT
else
  for b in "${bounds[@]}"; do
    # shellcheck disable=SC2046
    run_bound $(bound_args "$b") || failed+=("$b")
  done
fi
echo "matrix: done in $SECONDS s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "matrix: FAILED: ${failed[*]}" >&2
  exit 1
fi
