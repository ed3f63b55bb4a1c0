#!/usr/bin/env bash
# ensure-venv.sh PYTHON VENV: a virtualenv with the project installed editable with its test extras.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
python=$1 venv=$2
command -v "$python" >/dev/null || die "no $python on PATH (install python3 >= 3.11: apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than 3.11"
if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        apt_install python3-venv
        run_logged "python -m venv" "$python" -m venv "$venv"
    fi
fi
say "installing the project and its test extras into $venv"
run_logged "pip upgrade" "$venv/bin/pip" install -q -U pip wheel
run_logged "pip install" "$venv/bin/pip" install -q -e '.[dev,fabric]'
# hfc (fabric-sdk-py 1.0.0) pins requests==2.20.0, which docker and kubernetes cannot use: installed without its
# pins, on top of the fabric extra that lists what it really needs (DEVELOPERS.md).
run_logged "pip install hfc" "$venv/bin/pip" install -q --no-deps 'fabric-sdk-py==1.0.0'
