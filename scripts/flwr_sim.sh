#!/usr/bin/env bash
# Run fedmllm through `flwr run` on a simulation SuperLink that this script starts and stops.
#
#   scripts/flwr_sim.sh "model=tiny-llava num_rounds=2 num_clients=2 clients_per_round=2"
#
# `flwr run . local` would start a detached SuperLink that outlives the command; here the
# SuperLink is ours: bound to 127.0.0.1, in its own process group, killed on exit (also on
# Ctrl-C or failure). Env: FLWR_HOME (default ./.flwr), FEDMLLM_SUPERLINK_PORT (default 39191).
# The number of simulated SuperNodes follows num_clients in the overrides (default 4).
set -euo pipefail

OVERRIDES="${1:-}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export FLWR_HOME="${FLWR_HOME:-$ROOT/.flwr}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
PORT="${FEDMLLM_SUPERLINK_PORT:-39191}"
NODES="$(printf '%s\n' $OVERRIDES | sed -n 's/^num_clients=//p' | tail -1)"
NODES="${NODES:-4}"

PIDS="$FLWR_HOME" LOGS="$FLWR_HOME"  # $FLWR_HOME/superlink.pid, $FLWR_HOME/superlink.log
# shellcheck source=scripts/processes.sh
. "$ROOT/scripts/processes.sh"

for tool in flower-superlink flwr; do
  command -v "$tool" >/dev/null || die "$tool not found; activate the venv first: . .venv/bin/activate"
done
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedmllm-sim"

[superlink.fedmllm-sim]
address = "127.0.0.1:$PORT"
insecure = true
options.num-supernodes = $NODES
options.backend.client-resources.num-cpus = 2
options.backend.client-resources.num-gpus = 0.0
TOML

launch superlink flower-superlink --insecure --simulation --isolation subprocess \
  --host 127.0.0.1 --port "$PORT" --health-server-address "127.0.0.1:$((PORT + 1))" \
  --disable-runtime-dependency-installation --database "$FLWR_HOME/state.db"
trap 'stop_one superlink' EXIT
wait_port superlink 127.0.0.1 "$PORT"

cd "$ROOT"
flwr run . fedmllm-sim --run-config "overrides='$OVERRIDES'" --stream
