#!/usr/bin/env bash
# The README's test command: sets up .venv (if missing) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
