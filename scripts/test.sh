#!/usr/bin/env bash
# The test command: set up, lint, then the whole pytest suite (it builds the zoo once, about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The MLflow UI test drives Debian's headless Chromium through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's chromium and chromium-driver for the MLflow UI test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium and chromium-driver are missing; install them (sudo apt-get install chromium chromium-driver)"
  fi
fi
ruff check .
ruff format --check .
# The import contracts: the layers point one way (cli -> cluster -> search -> merges, evaluators -> core).
python scripts/check_layers.py
started=$SECONDS
status=0
pytest "$@" || status=$?
echo "tests: pytest ran for $((SECONDS - started)) s"
exit $status
