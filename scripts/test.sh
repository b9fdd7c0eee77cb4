#!/usr/bin/env bash
# The test command: set up, lint, then the whole pytest suite (it builds the zoo once, about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ruff check .
ruff format --check .
started=$SECONDS
status=0
pytest "$@" || status=$?
echo "tests: pytest ran for $((SECONDS - started)) s"
exit $status
