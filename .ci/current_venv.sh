#!/usr/bin/env bash
# Set up the current lane's venv, cached between runs, and install this checkout into it.
#
#   .ci/current_venv.sh PYTHON VENV_DIR REQUIREMENTS
#
# VENV_DIR is built once (PYTHON -m venv, then REQUIREMENTS: torch and megatron-core, as an NGC
# container would have them) and reused while it has its completion mark; a half-built one is
# rebuilt. Then `pip install -e .[test]` adds the package and its other requirements. A lock
# serialises checkouts that share the cache. Prints the venv's python on the last line.
set -euo pipefail
PYTHON=$1 VENV=$2 REQS=$3
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ ! -f "$VENV/.complete" ]; then
    echo "current lane: building $VENV (torch and megatron-core from $REQS; several minutes the first time)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q setuptools wheel
    "$VENV/bin/python" -m pip install -q -r "$REQS"
    touch "$VENV/.complete"
else
    echo "current lane: reusing $VENV"
fi
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
echo "$VENV/bin/python"
