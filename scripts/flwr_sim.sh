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

for tool in flower-superlink flwr; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; activate the venv first: . .venv/bin/activate" >&2; exit 2; }
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

setsid flower-superlink --insecure --simulation --isolation subprocess \
  --host 127.0.0.1 --port "$PORT" --health-server-address "127.0.0.1:$((PORT + 1))" \
  --disable-runtime-dependency-installation \
  --database "$FLWR_HOME/state.db" --log-file "$FLWR_HOME/superlink.log" &
SUPERLINK_PID=$!
echo "$SUPERLINK_PID" > "$FLWR_HOME/superlink.pid"
stop() {
  kill -TERM -- "-$SUPERLINK_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$SUPERLINK_PID" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$SUPERLINK_PID" 2>/dev/null || true
  rm -f "$FLWR_HOME/superlink.pid"
}
trap stop EXIT

ready=0
for _ in $(seq 200); do  # wait until the SuperLink answers (up to about a minute)
  if ! kill -0 "$SUPERLINK_PID" 2>/dev/null; then
    echo "error: flower-superlink exited; its log: $FLWR_HOME/superlink.log" >&2
    tail -n 20 "$FLWR_HOME/superlink.log" >&2 || true
    exit 1
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    ready=1; break
  fi
  sleep 0.3
done
[ "$ready" = 1 ] || { echo "error: the SuperLink did not open 127.0.0.1:$PORT within a minute" >&2; exit 1; }

cd "$ROOT"
flwr run . fedmllm-sim --run-config "overrides='$OVERRIDES'" --stream
