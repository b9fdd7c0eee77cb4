#!/usr/bin/env bash
# The main job: set up, build (or reuse) the data and the zoo, start an MLflow server on 127.0.0.1, run the
# zoo search on configs/zoo.yaml against it, and print the Pareto front and the MLflow URL.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS  # the printed time includes the set-up: on a fresh clone, that is the whole job
source scripts/setup.sh
SEED=${SEED:-0}
PORT=${MLFLOW_PORT:-5000}
URL="http://127.0.0.1:$PORT"
mkdir -p artifacts
# The MLflow server starts first and comes up while the data and the zoo are built (it needs about 20 s).
if ! curl -sf "$URL/health" >/dev/null 2>&1; then
  echo "demo: starting the MLflow server on $URL (sqlite store artifacts/mlflow-server.db)"
  nohup mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
    --backend-store-uri "sqlite:///$PWD/artifacts/mlflow-server.db" \
    --artifacts-destination "$PWD/artifacts/mlartifacts" > artifacts/mlflow-server.log 2>&1 &
  echo $! > artifacts/mlflow-server.pid
  # A demo that fails before its search does not leave the server it started behind.
  trap 'status=$?; [ "$status" = 0 ] || [ -n "${searching:-}" ] || kill "$(cat artifacts/mlflow-server.pid)" 2>/dev/null; exit "$status"' EXIT
fi
safemerge data generate --out artifacts/data --seed "$SEED" --reuse
# Only the models configs/zoo.yaml merges and judges with (the tests build the whole zoo).
safemerge zoo build --out artifacts/zoo --seed "$SEED" --reuse --models base,aligned,medical
for _ in $(seq 1 120); do curl -sf "$URL/health" >/dev/null 2>&1 && break; sleep 0.5; done
curl -sf "$URL/health" >/dev/null || { echo "demo: MLflow server did not start; see artifacts/mlflow-server.log"; exit 1; }

# The search (Pareto front tested on the test split and registered), and the paper's comparison around it:
# aligned, the expert, LM-Cocktail, the grid-search merge, a domain-only search and the full search.
NAME="zoo-medical-$(date +%Y%m%d-%H%M%S)"
searching=1  # from here on the server holds the search's runs: it stays up, failed or not
safemerge search compare configs/zoo.yaml --name "$NAME" --set "mlflow.tracking_uri=$URL" \
  --grid-trials "${GRID_TRIALS:-9}" --domain-only-trials "${DOMAIN_ONLY_TRIALS:-12}" ${TRIALS:+--trials "$TRIALS"} \
  ${VERBOSE:+--verbose}  # VERBOSE=1: the libraries' own output (Ray Tune, Optuna, MLflow, vLLM) too
echo
echo "demo: done in $((SECONDS - started)) s, set-up included"
echo "demo: MLflow UI: $URL (experiment 'safemerge', parent run '$NAME'); stop the server with"
echo "      kill \$(cat artifacts/mlflow-server.pid)"
