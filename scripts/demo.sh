#!/usr/bin/env bash
# Set up (idempotent), then prune the embedded SmolLM2-135M with the published Moreau settings
# (20 % of layers 4..27, 10 x 64 calibration tokens, T = 10) and print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
moreau-prune --out pruned-smollm2 --overwrite --json pruned-smollm2-report.json "$@"
