#!/bin/sh
# Secure aggregation in a deployment (docs/benchmarks.md "Secure aggregation"): a SuperLink and N
# SuperNodes on this machine (scripts/deploy.sh up), the same run with and without
# secure_aggregation=true, for the tiny model and the demo model; then the wall time per round
# (rounds after the first: the first also starts every node's worker and loads its model) side by
# side with the ratio. Evaluation only at round 0 and the last (eval_every=100), so the rounds time
# training and aggregation.
#   bench/secure.sh                                  # N=10, 4 rounds, both models
#   N=4 ROUNDS=3 MODELS=smol-llava bench/secure.sh   # the demo's 4 nodes
#   N=10 ROUNDS=2 MODELS=smol-llava SMOL="+experiment=offline_grid train.local_steps=1 train.gradient_checkpointing=true" bench/secure.sh
#     the demo model at 10 nodes on a 24 GiB machine: a worker peaks at 3.2 GB while training
#     without gradient checkpointing (10 of them did not fit), 1.6 GB with it
set -e
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# the SuperLink's state in memory: 10 smol-llava workers loading at once on 2 cores locked its SQLite
# file past its timeout ("database is locked"), failing heartbeats and pulls in round 1
export FEDMLLM_DATABASE=${FEDMLLM_DATABASE:-memory}
N=${N:-10}
ROUNDS=${ROUNDS:-4}
OUT=${OUT:-multirun/secure/$(date +%Y-%m-%d_%H-%M-%S)}
PY=${PY:-.venv/bin/python}
COMMON="num_clients=$N clients_per_round=$N num_rounds=$ROUNDS eval_every=100 dataset.eval_samples=16"
MODELS=${MODELS:-tiny-llava smol-llava}
SMOL=${SMOL:-+experiment=offline_grid}
for model in $MODELS; do
  # tiny-llava: no server stages, 1 local step (a round that is nearly all overhead); smol-llava: the
  # offline benchmark task (+experiment=offline_grid: the flag task, whose stage caches the other
  # issue-23 benchmarks build) with its 4 local steps of 8 (a round that trains)
  stage="$SMOL"
  [ "$model" = tiny-llava ] && stage="server_stage=none train.local_steps=1"
  for secure in false true; do
    scripts/deploy.sh up "$N" "model=$model $stage $COMMON secure_aggregation=$secure out_dir=$OUT/$model-$secure"
    # the ServerApp's log: its round trips ("train: 10 of 10 replies in 12.3 s"), one per SecAgg+ stage
    cp "${FLWR_HOME:-.flwr}/logs/run-app.out" "$OUT/$model-$secure/serverapp.log" 2>/dev/null || true
  done
done
$PY - "$OUT" $MODELS <<'PY'
import json, re, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])

def per_round(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    t = [r["seconds"] for r in rows]
    return [b - a for a, b in zip(t[1:], t[2:])]  # rounds 2.. (round 1 starts the workers)

print("| model | nodes | plain s/round | SecAgg+ s/round | ratio | final accuracy plain / SecAgg+ |")
print("|---|---|---|---|---|---|")
for model in sys.argv[2:]:
    plain, secure = out / f"{model}-false", out / f"{model}-true"
    p, s = statistics.median(per_round(plain)), statistics.median(per_round(secure))
    acc = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]).get("accuracy") for d in (plain, secure)]
    nodes = len(json.loads((plain / "metrics.jsonl").read_text().splitlines()[1])["clients"])
    print(f"| {model} | {nodes} | {p:.1f} | {s:.1f} | {s / p:.2f}x | {acc[0]:.3f} / {acc[1]:.3f} |")
for model in sys.argv[2:]:  # each round trip of each run, in order (SecAgg+: 4 a round)
    for secure in ("false", "true"):
        log = out / f"{model}-{secure}" / "serverapp.log"
        trips = re.findall(r"replies in ([\d.]+) s", log.read_text(errors="replace")) if log.exists() else []
        print(f"{model} secure_aggregation={secure} round trips (s):", " ".join(trips) or "-")
PY
