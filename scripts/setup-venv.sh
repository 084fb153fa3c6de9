#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and torchnmf installed with all extras.
# Skips the install when .venv is current: the stamp .venv/.torchnmf-stamp holds a checksum of
# setup.cfg, pyproject.toml and this script, written after a complete install. Editing any of
# them (or deleting the stamp) reinstalls; the package itself is installed editable, so
# changes to its code need no reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.torchnmf-stamp
want=$(cat setup.cfg pyproject.toml scripts/setup-venv.sh | cksum)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,docs]'
echo "$want" > "$stamp"
