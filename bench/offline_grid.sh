#!/bin/sh
# The offline modality-heterogeneity grid (docs/benchmarks.md "Modality heterogeneity, offline
# grid"): every cell x seed of experiment=offline_grid in one Hydra sweep, then its report with
# the seeds grouped (mean ± std) and FedMLLM's scenarios x methods table.
#   bench/offline_grid.sh                          # 3 seeds (42, 43, 44): 42 jobs
#   SEEDS=42 bench/offline_grid.sh                 # 1 seed: 14 jobs
#   OUT=multirun/grid bench/offline_grid.sh        # where the sweep goes (default: dated)
# Cells: aligned; missing at rates 0.3 and 0.6; cross (2 of 4 clients image-only); hybrid (q 0.4);
# FedMLLM's methods (modality-agnostic prompt, adaptive regularization) on missing and hybrid;
# the local-only baseline of each client and the centralized baseline, on aligned data.
set -e
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
SEEDS=${SEEDS:-42,43,44}
OUT=${OUT:-multirun/offline_grid/$(date +%Y-%m-%d_%H-%M-%S)}
CELLS=aligned,missing,missing_high,cross,hybrid,missing_aug,missing_adareg,hybrid_aug,hybrid_adareg
CELLS=$CELLS,local0,local1,local2,local3,centralized
FEDMLLM=${FEDMLLM:-.venv/bin/fedmllm}
# seed first: Hydra varies the last parameter fastest, so each seed's server stages are built once
# (its first job) and the seed's jobs follow one another.
$FEDMLLM run -m +experiment=offline_grid seed="$SEEDS" +cell="$CELLS" hydra.sweep.dir="$OUT"
$FEDMLLM report "$OUT"
