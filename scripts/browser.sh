#!/usr/bin/env bash
# scripts/browser.sh — the headless Chromium the browser test (tests/test_ui.py) drives against the Prefect UI.
#
#   bash scripts/browser.sh up      install Debian's chromium if it is missing, then print its path
#   bash scripts/browser.sh status  exit 0 (printing its path) if a usable chromium is installed, 1 otherwise
#
# Idempotent and fast when Chromium is there (one `chromium --version`). Installing takes about 45 s on a 2-core
# machine with the package lists fresh. `up` needs root for apt-get: as another user it re-runs itself through
# `sudo -n` (never prompts, so CI cannot hang on a password), as scripts/slurm.sh does.
#
# --no-install-recommends skips upower, udev, mesa's GL drivers, the printer and notification daemons (none of
# which headless rendering uses); fonts-liberation (a recommend) is asked for by name, so screenshots have text.
set -euo pipefail

PACKAGES=(chromium fonts-liberation)
LOG="${TMPDIR:-/tmp}/slurmctl-browser-apt.log"

log() { echo "browser: $*"; }
die() { echo "browser: ERROR: $*" >&2; exit 1; }

# The installed Chromium's path, if it starts (`--version` runs the real binary: a half-installed package fails).
found() {
    local b
    for b in chromium chromium-browser; do
        if command -v "$b" >/dev/null 2>&1 && "$b" --version >/dev/null 2>&1; then
            command -v "$b"
            return 0
        fi
    done
    return 1
}

cmd_up() {
    local t0=$SECONDS path
    if path=$(found); then
        echo "$path"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "chromium is not installed and this is not a Debian/Ubuntu machine (no apt-get): install Chromium" \
               "yourself, so that \`chromium\` is on PATH"
    log "installing ${PACKAGES[*]} (apt-get, about a minute)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # The package lists first: on a fresh machine (CI) they are empty or stale, and install alone finds nothing.
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$LOG" 2>&1
    then
        tail -n 30 "$LOG" >&2
        die "apt-get install ${PACKAGES[*]} failed (full log: $LOG)"
    fi
    path=$(found) || die "apt-get installed ${PACKAGES[*]}, but \`chromium --version\` fails: $(chromium --version 2>&1 | tail -n 3)"
    log "installed in $((SECONDS - t0))s: $("$path" --version 2>/dev/null)" >&2
    echo "$path"
}

cmd_status() {
    local path
    if path=$(found); then
        echo "$path"
        return 0
    fi
    log "chromium is not installed (bash scripts/browser.sh up installs it)" >&2
    return 1
}

# Only `up` may need root, and only when Chromium is missing.
if [[ ${1:-} == up && $(id -u) -ne 0 ]] && ! found >/dev/null; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n env TMPDIR="${TMPDIR:-/tmp}" bash "$0" "$@"
    fi
    die "chromium is not installed, and installing it (apt-get) needs root: user $(id -un) is not root and cannot" \
        "use sudo without a password. Run \`sudo bash $0 up\`, or give this user passwordless sudo (as CI runners have)."
fi

case "${1:-}" in
    up) cmd_up ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|status" >&2; exit 2 ;;
esac
