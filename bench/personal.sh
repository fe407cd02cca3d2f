#!/bin/sh
# Global vs personalized accuracy (docs/benchmarks.md "Global vs personalized"): the offline flag
# task (experiment=offline_grid: 4 clients, FedMLLM's partition at alpha 5, 3 rounds, the server's
# stages) with every client holding a fifth of its partition out (eval.client_fraction=0.2) and
# evaluating its own model on it: FedAvg's clients the global model, FedSA-LoRA's their personal one
# (global A + own B), on aligned and missing (m=0.3) data; then `fedmllm report`'s table.
#   bench/personal.sh          # 4 jobs, about 4 min each on 2 cores
set -e
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
OUT=${OUT:-multirun/personal/$(date +%Y-%m-%d_%H-%M-%S)}
FEDMLLM=${FEDMLLM:-.venv/bin/fedmllm}
$FEDMLLM run -m +experiment=offline_grid eval.client_fraction=0.2 +cell=aligned,missing \
  aggregator=fedavg,fedsa_lora hydra.sweep.dir="$OUT"
$FEDMLLM report "$OUT"
