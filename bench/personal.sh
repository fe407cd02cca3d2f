#!/bin/sh
# Global vs personalized accuracy (docs/benchmarks.md "Global vs personalized"): the offline flag
# task (experiment=offline_grid: 4 clients, FedMLLM's partition at alpha 5, 3 rounds, the server's
# stages) with every client holding a fifth of its partition out (eval.client_fraction=0.2) and
# evaluating its own model on it: FedAvg's clients the global model, FedSA-LoRA's their personal one
# (global A + own B), on aligned and missing (m=0.3) data; then `fedmllm report`'s table.
# FedSA-LoRA's adapter starts from PEFT's init (A random, B zero: the server's pre-trained adapter
# would not reach the clients' B), FedAvg's from the server's pre-trained adapter; the control runs
# FedAvg from PEFT's init too (server_stage.pretrain.lora.enabled=false; stage 1 still runs), so the
# report separates the start from the method ("fedavg (no pre-trained adapter)").
#   bench/personal.sh                 # 6 jobs, about 7.5 min each on 2 cores
#   CELLS=missing bench/personal.sh   # one scenario
set -e
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
OUT=${OUT:-multirun/personal/$(date +%Y-%m-%d_%H-%M-%S)}
FEDMLLM=${FEDMLLM:-.venv/bin/fedmllm}
CELLS=${CELLS:-aligned,missing}
RUN="$FEDMLLM run -m +experiment=offline_grid eval.client_fraction=0.2 +cell=$CELLS"
$RUN aggregator=fedavg,fedsa_lora hydra.sweep.dir="$OUT/methods"
$RUN aggregator=fedavg server_stage.pretrain.lora.enabled=false hydra.sweep.dir="$OUT/control"
$FEDMLLM report "$OUT/methods" "$OUT/control" --out "$OUT"
