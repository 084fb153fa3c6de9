#!/usr/bin/env bash
# The README's main job: set up .venv, fit NMF to scikit-learn's digits, plot the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. .venv/bin/activate
mkdir -p out
torchnmf fit --model nmf --rank 16 --max-iter 1500 -o out/digits "$@"
torchnmf plot out/digits
