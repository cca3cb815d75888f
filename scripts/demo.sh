#!/usr/bin/env bash
# Set up (idempotent), then prune the embedded SmolLM2-135M with moreau-prune's defaults (the best
# measured configuration: Moreau paper mode, query heads, 18.5 % of layers 4..29, 10 x 64 calibration
# tokens, T = 10) and print the report. Add --published for MoreauPruner's published settings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
moreau-prune --out pruned-smollm2 --overwrite --json pruned-smollm2-report.json "$@"
