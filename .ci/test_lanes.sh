#!/usr/bin/env bash
# `make test`: the fast lane, then the current lane, whose venv is set up in the background while
# the fast lane runs. Prints both lanes' results; exits non-zero if either lane failed.
set -uo pipefail
cd "$(dirname "$0")/.."
MAKE=${MAKE:-make}
LOGS=${LANE_LOGS:-.lanes}
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.rc
start=$(date +%s)

echo "== current lane: setting up its venv in the background (log: $LOGS/current-setup.log)"
( $MAKE --no-print-directory current-install > "$LOGS/current-setup.log" 2>&1
  echo $? > "$LOGS/current-setup.rc" ) &
setup_pid=$!

echo "== fast lane"
$MAKE --no-print-directory test-fast 2>&1 | tee "$LOGS/fast.log"
fast_rc=${PIPESTATUS[0]}

wait "$setup_pid"
if [ "$(cat "$LOGS/current-setup.rc" 2>/dev/null)" = 0 ]; then
    echo "== current lane"
    $MAKE --no-print-directory test-current 2>&1 | tee "$LOGS/current.log"
    current_rc=${PIPESTATUS[0]}
else
    echo "== current lane: set-up failed"
    tail -40 "$LOGS/current-setup.log" | tee "$LOGS/current.log"
    current_rc=1
fi

stack() {  # the lane's interpreter, megatron-core and torch
    "$1" -c 'import sys, torch; from megatron.core import package_info as p
print(f"Python {sys.version.split()[0]}, megatron-core {p.__version__}, torch {torch.__version__}")' 2>/dev/null || echo "?"
}
result() {  # pytest's summary line, or why there is none
    grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$1" | tail -1 | sed -E 's/^=+ //; s/ =+$//' \
        || true
}
verdict() { [ "$1" = 0 ] && echo "OK" || echo "FAILED (exit $1)"; }
fast_py=$($MAKE --no-print-directory -s -f Makefile print-fast-python 2>/dev/null)
current_py=$($MAKE --no-print-directory -s -f Makefile print-current-python 2>/dev/null)

echo
echo "================================ make test: both lanes ================================"
printf '%-8s %s\n         %s\n         %s\n' "fast" "$(stack "$fast_py")" "$(result "$LOGS/fast.log")" "$(verdict $fast_rc)"
printf '%-8s %s\n         %s\n         %s\n' "current" "$(stack "$current_py")" "$(result "$LOGS/current.log")" "$(verdict $current_rc)"
echo "wall time $(( $(date +%s) - start )) s; logs in $LOGS/"
[ "$fast_rc" = 0 ] && [ "$current_rc" = 0 ]
