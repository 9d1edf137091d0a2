#!/usr/bin/env bash
# `make test`: the fast lane and the current lane side by side. The current lane's venv is set up
# while the fast lane runs, then the current lane's tests run next to it. Each lane writes its
# own log (a progress line per lane each minute); at the end both lanes' results are printed and the
# failures of a failed lane repeated. Exits non-zero if either lane failed.
#
# Side by side, not one after the other: most tests wait on process start-up, gloo and each
# other's ranks more than they compute (a lane alone keeps ~1.1 of the 2 cores busy), so two
# lanes share the machine well. What they must not share is a moment with two multi-rank jobs
# (gloo collectives wait on the scheduler for every rank): each launch takes one slot per rank
# from a machine-wide pool (tests/parallel/rank_slots.py). The lanes share no other files: every
# test writes under its own temp directory, and the fake-CUDA shim is built per torch build.
set -uo pipefail
cd "$(dirname "$0")/.."
MAKE=${MAKE:-make}
LOGS=${LANE_LOGS:-.lanes}
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.rc
start=$(date +%s)

run_lane() {  # name, make target: runs it into $LOGS/<name>.log, its exit status in $LOGS/<name>.rc
    local name=$1 target=$2
    $MAKE --no-print-directory "$target" > "$LOGS/$name.log" 2>&1
    echo $? > "$LOGS/$name.rc"
}

echo "== fast lane: setting up .venv"
$MAKE --no-print-directory install > "$LOGS/fast-setup.log" 2>&1 || { tail -40 "$LOGS/fast-setup.log"; exit 1; }
echo "== fast lane started after $(( $(date +%s) - start )) s (log: $LOGS/fast.log)"
run_lane fast test-fast &
fast_pid=$!

echo "== current lane: setting up its venv (log: $LOGS/current-setup.log)"
if $MAKE --no-print-directory current-install > "$LOGS/current-setup.log" 2>&1; then
    echo "== current lane started after $(( $(date +%s) - start )) s (log: $LOGS/current.log)"
    run_lane current test-current &
    current_pid=$!
else
    echo "== current lane: set-up failed"
    tail -40 "$LOGS/current-setup.log" | tee "$LOGS/current.log"
    echo 1 > "$LOGS/current.rc"
    current_pid=
fi

# progress while both run: each lane's pytest progress line, once a minute
while kill -0 "$fast_pid" 2>/dev/null || { [ -n "$current_pid" ] && kill -0 "$current_pid" 2>/dev/null; }; do
    sleep 60
    for lane in fast current; do
        [ -f "$LOGS/$lane.log" ] && [ ! -f "$LOGS/$lane.rc" ] && \
            printf '   %-8s %s\n' "$lane" "$(grep -E '^tests/.* \[ *[0-9]+%\]$' "$LOGS/$lane.log" | tail -1 | cut -c1-100)"
    done
done
wait "$fast_pid"
[ -n "$current_pid" ] && wait "$current_pid"
fast_rc=$(cat "$LOGS/fast.rc" 2>/dev/null || echo 1)
current_rc=$(cat "$LOGS/current.rc" 2>/dev/null || echo 1)

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

for lane in fast current; do
    rc=$(cat "$LOGS/$lane.rc" 2>/dev/null || echo 1)
    if [ "$rc" != 0 ]; then
        echo
        echo "================================ $lane lane: failures ================================"
        if grep -q "short test summary info" "$LOGS/$lane.log"; then
            sed -n '/^=* FAILURES =*$/,$p' "$LOGS/$lane.log" | tail -400
        else
            tail -100 "$LOGS/$lane.log"
        fi
    fi
done

echo
echo "================================ make test: both lanes ================================"
printf '%-8s %s\n         %s\n         %s\n' "fast" "$(stack "$fast_py")" "$(result "$LOGS/fast.log")" "$(verdict "$fast_rc")"
printf '%-8s %s\n         %s\n         %s\n' "current" "$(stack "$current_py")" "$(result "$LOGS/current.log")" "$(verdict "$current_rc")"
echo "wall time $(( $(date +%s) - start )) s; logs in $LOGS/"
[ "$fast_rc" = 0 ] && [ "$current_rc" = 0 ]
