#!/bin/sh
# Client-level differential privacy (docs/benchmarks.md "Differential privacy"): accuracy against
# epsilon on the offline flag task (experiment=offline_grid: smol-llava 4-bit with the server's
# stages, FedMLLM's partition at alpha 5, 3 rounds) with 10 clients, all sampled each round, 2 local
# steps of 8: privacy=none, then privacy=dp_client_fixed at epsilon 1, 4, 8 (delta 1e-5) with two
# clipping norms, the clients' median raw update norm (3: measured, one round) and a small one (0.01).
#   bench/privacy.sh                  # 7 jobs, about 4.5 min each on 2 cores
#   DEMO=1 bench/privacy.sh           # also the demo (fedmllm run, 4 clients): none, epsilon 1, 4, 8
#   ONLY_DEMO=1 bench/privacy.sh      # the demo's 4 jobs alone (about 6 min each with the stages cached)
set -e
: "${DEMO:=}" "${ONLY_DEMO:=}"
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
OUT=${OUT:-multirun/privacy/$(date +%Y-%m-%d_%H-%M-%S)}
FEDMLLM=${FEDMLLM:-.venv/bin/fedmllm}
TASK="+experiment=offline_grid num_clients=10 clients_per_round=10 train.local_steps=2"
if [ -z "$ONLY_DEMO" ]; then
  $FEDMLLM run -m $TASK privacy=none hydra.sweep.dir="$OUT/none"
  $FEDMLLM run -m $TASK privacy=dp_client_fixed privacy.clipping_norm=3,0.01 privacy.target_epsilon=1,4,8 \
    hydra.sweep.dir="$OUT/dp"
  $FEDMLLM report "$OUT/none"
  $FEDMLLM report "$OUT/dp"
fi
if [ -n "$DEMO$ONLY_DEMO" ]; then
  $FEDMLLM run -m privacy=none hydra.sweep.dir="$OUT/demo_none"
  $FEDMLLM run -m privacy=dp_client_fixed privacy.target_epsilon=1,4,8 privacy.clipping_norm=0.01 \
    hydra.sweep.dir="$OUT/demo_dp"
  $FEDMLLM report "$OUT/demo_none" "$OUT/demo_dp" --out "$OUT"
fi
