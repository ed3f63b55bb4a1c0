#!/usr/bin/env bash
# run-tests.sh PYTEST [ARGS...]: the suite as two pytest processes side by side, the machine's two cores busy.
#   - the tests of machine-wide things, one after another: the Docker engine (containers, volumes and networks
#     are global; tests/conftest.py sweeps job volumes by comparing before and after), network namespaces and
#     the Fabric network (markers docker, netns, fabric); their output streams here;
#   - every other test, in a second process; its output is kept in build/test-logs/others.log and printed when
#     the first part is done.
# Each process starts its own Mosquitto, PostgreSQL and moto (tests/infra.py, free ports). With ARGS (a file, a
# marker), one pytest runs them as given.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
pytest=$1
shift
common=(-p no:cacheprovider --timeout=900 --durations=20)
if [ $# -gt 0 ]; then
    exec "$pytest" "${common[@]}" "$@"
fi
machine="docker or netns or fabric"
logs=build/test-logs
mkdir -p "$logs"
others_log=$logs/others.log
say "pytest: tests marked $machine here; the others side by side (log: $others_log)"
"$pytest" "${common[@]}" -m "not ($machine)" >"$others_log" 2>&1 &
others=$!
trap 'kill "$others" 2>/dev/null' INT TERM
"$pytest" "${common[@]}" -m "$machine"
machine_rc=$?
wait "$others"
others_rc=$?
say "pytest: the other tests (not $machine), from $others_log"
cat "$others_log"
say "pytest exit codes: $machine: $machine_rc; the others: $others_rc"
[ "$machine_rc" -eq 0 ] && [ "$others_rc" -eq 0 ]
