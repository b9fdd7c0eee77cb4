#!/usr/bin/env bash
# The main job: set up, then build (or reuse) the synthetic data and the zoo under ./artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
started=$SECONDS
SEED=${SEED:-0}
safemerge data generate --out artifacts/data --seed "$SEED" --reuse
safemerge zoo build --out artifacts/zoo --seed "$SEED" --reuse
echo "demo: done in $((SECONDS - started)) s (data: artifacts/data, zoo: artifacts/zoo)"
