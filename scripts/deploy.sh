#!/usr/bin/env bash
# fedmllm on Flower's deployment runtime: a SuperLink and SuperNodes as real processes.
#
# One machine (SuperLink + 2 SuperNodes on 127.0.0.1, a run, everything stopped afterwards):
#   scripts/deploy.sh up 2 "model=tiny-llava num_clients=2 clients_per_round=2 num_rounds=2"
# Step by step (the processes keep running between commands):
#   scripts/deploy.sh start 2            # SuperLink + SuperNodes 0 and 1 of 2
#   scripts/deploy.sh run "model=tiny-llava num_clients=2 clients_per_round=2"
#   scripts/deploy.sh status
#   scripts/deploy.sh stop               # every process this script started, by PID
# Several machines (same commands, other addresses):
#   server:   FEDMLLM_BIND=0.0.0.0 scripts/deploy.sh superlink
#   server:   scripts/deploy.sh register node-i.key.pub   (with FEDMLLM_NODE_AUTH=1: once per node key)
#   client i: FEDMLLM_SUPERLINK=server.example.org:9093 scripts/deploy.sh supernode i N [data-dir=DIR] [lora-rank=R]
#   server:   scripts/deploy.sh run "num_clients=N clients_per_round=N ..."
#
# Settings (environment):
#   FLWR_HOME          project-local Flower home: config.toml, pids, logs, state (default ./.flwr)
#   FEDMLLM_BIND       SuperLink bind host (default 127.0.0.1; 0.0.0.0 to accept other machines)
#   FEDMLLM_PORT       SuperLink port: Fleet, Control and ServerAppIo over one HTTP port (default 9093)
#   FEDMLLM_SUPERLINK  the address SuperNodes and `flwr` dial (default 127.0.0.1:$FEDMLLM_PORT)
#   FEDMLLM_NODE_PORT  first SuperNode runtime-API port; node i uses +i (default $FEDMLLM_PORT+10)
#   FEDMLLM_TLS_DIR    TLS on: ca.pem, server.pem, server.key from scripts/certs.py tls DIR
#   FEDMLLM_NODE_AUTH  1: only SuperNodes whose public key is registered may join; key of node i:
#                      $FEDMLLM_TLS_DIR/node-i.key (scripts/certs.py node-keys DIR N); needs TLS.
#                      `start` registers the keys it uses; across machines run `register` on the server
#   FEDMLLM_DATA_DIR   data-dir for every SuperNode `start` launches (a `fedmllm partition` dir)
#   FEDMLLM_LORA_RANKS space-separated lora-rank per SuperNode, e.g. "4 8" (aggregator=flora)
#   FEDMLLM_DATABASE   the SuperLink's state (default $FLWR_HOME/state.db: a restarted SuperLink resumes it);
#                      "memory": Flower's in-memory state, no SQLite "database is locked" on a loaded host
#   FEDMLLM_NODE_SETTLE seconds a started SuperNode must stay up to count as started (default 5 with TLS, 0 without)
# Telemetry, update checks and the SuperLink's run-time dependency installation are off.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export FLWR_HOME="${FLWR_HOME:-$ROOT/.flwr}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
BIND="${FEDMLLM_BIND:-127.0.0.1}"
PORT="${FEDMLLM_PORT:-9093}"
SUPERLINK="${FEDMLLM_SUPERLINK:-127.0.0.1:$PORT}"
NODE_PORT="${FEDMLLM_NODE_PORT:-$((PORT + 10))}"
TLS_DIR="${FEDMLLM_TLS_DIR:-}"
NODE_AUTH="${FEDMLLM_NODE_AUTH:-0}"
DATABASE="${FEDMLLM_DATABASE:-$FLWR_HOME/state.db}"
[ "$DATABASE" = memory ] && DATABASE=":flwr-in-memory:"
CONN=fedmllm-deploy
PIDS="$FLWR_HOME/pids"
LOGS="$FLWR_HOME/logs"

# shellcheck source=scripts/processes.sh
. "$ROOT/scripts/processes.sh"

for tool in flower-superlink flower-supernode flwr; do
  command -v "$tool" >/dev/null || die "$tool not found; activate the venv first: . .venv/bin/activate"
done
if [ -n "$TLS_DIR" ]; then
  TLS_DIR="$(cd "$TLS_DIR" 2>/dev/null && pwd)" || die "FEDMLLM_TLS_DIR=${FEDMLLM_TLS_DIR} does not exist; create it with: python scripts/certs.py tls DIR"
  [ -f "$TLS_DIR/ca.pem" ] || die "FEDMLLM_TLS_DIR=$TLS_DIR lacks ca.pem; create it with: python scripts/certs.py tls $TLS_DIR"
fi
if [ "$NODE_AUTH" = 1 ] && [ -z "$TLS_DIR" ]; then
  die "FEDMLLM_NODE_AUTH=1 needs TLS (Flower refuses node authentication without it); set FEDMLLM_TLS_DIR"
fi
mkdir -p "$PIDS" "$LOGS"

tls_link_args() {  # what a SuperNode or the CLI needs to reach the SuperLink
  if [ -n "$TLS_DIR" ]; then echo "--root-certificates $TLS_DIR/ca.pem"; else echo "--insecure"; fi
}

write_connection() {  # the connection `flwr run . fedmllm-deploy` reads
  local conf="$FLWR_HOME/config.toml"
  {
    echo '[superlink]'
    echo "default = \"$CONN\""
    echo
    echo "[superlink.$CONN]"
    echo "address = \"$SUPERLINK\""
    if [ -n "$TLS_DIR" ]; then echo "root-certificates = \"$TLS_DIR/ca.pem\""; else echo "insecure = true"; fi
  } > "$conf.tmp"
  mv "$conf.tmp" "$conf"
}

start_superlink() {
  local f
  for f in server.pem server.key; do  # only the SuperLink's machine needs these (clients: ca.pem)
    [ -z "$TLS_DIR" ] || [ -f "$TLS_DIR/$f" ] || die "FEDMLLM_TLS_DIR=$TLS_DIR lacks $f; create it with: python scripts/certs.py tls $TLS_DIR"
  done
  local tls=(--insecure)
  [ -n "$TLS_DIR" ] && tls=(--ssl-ca-certfile "$TLS_DIR/ca.pem" --ssl-certfile "$TLS_DIR/server.pem"
                            --ssl-keyfile "$TLS_DIR/server.key")
  [ "$NODE_AUTH" = 1 ] && tls+=(--enable-supernode-auth)
  launch superlink flower-superlink "${tls[@]}" --host "$BIND" --port "$PORT" \
    --disable-runtime-dependency-installation --database "$DATABASE"
  local host=$BIND; [ "$host" = 0.0.0.0 ] && host=127.0.0.1
  wait_port superlink "$host" "$PORT"
  write_connection
  echo "superlink: $SUPERLINK (PID $(cat "$PIDS/superlink.pid"), log $LOGS/superlink.log)"
}

register() {  # register KEY.pub: allow the SuperNode holding its private key to join (node auth)
  local pub=$1
  [ -f "$pub" ] || die "register: $pub not found; create keys with: python scripts/certs.py node-keys DIR N"
  write_connection
  # A key registered before (e.g. by an earlier `start` on the same state.db) is refused again; it still joins.
  flwr supernode register "$pub" "$CONN" || echo "note: $pub was not registered now (registered before?)"
}

node_value() {  # key=value as --node-config needs it: strings in double quotes (data-dir="/d")
  local k=${1%%=*} v=${1#*=}
  [[ "$1" == *=* ]] || die "node config '$1' is not key=value (e.g. data-dir=/data/partition lora-rank=8)"
  if [[ "$v" =~ ^-?[0-9]+(\.[0-9]+)?$ || "$v" =~ ^(true|false)$ || "$v" =~ ^\".*\"$ ]]; then
    echo "$k=$v"
  else
    echo "$k=\"$v\""
  fi
}

start_supernode() {  # start_supernode I N [key=value ...]
  local i=$1 n=$2; shift 2
  [[ "$i" =~ ^[0-9]+$ && "$n" =~ ^[0-9]+$ ]] || die "supernode needs PARTITION_ID NUM_PARTITIONS (integers), got '$i' '$n'"
  local auth=()
  if [ "$NODE_AUTH" = 1 ]; then
    local key="$TLS_DIR/node-$i.key"
    [ -f "$key" ] || die "node authentication: $key is missing; create it with: python scripts/certs.py node-keys $TLS_DIR $n"
    auth=(--auth-supernode-private-key "$key")
  fi
  local conf="partition-id=$i num-partitions=$n" kv
  for kv in "$@"; do conf+=" $(node_value "$kv")"; done
  # shellcheck disable=SC2046
  launch "supernode-$i" flower-supernode $(tls_link_args) --superlink "$SUPERLINK" "${auth[@]}" \
    --host 127.0.0.1 --port "$((NODE_PORT + i))" \
    --node-config "$conf"
  echo "supernode $i of $n -> $SUPERLINK (PID $(cat "$PIDS/supernode-$i.pid"), log $LOGS/supernode-$i.log)"
}

settle_supernodes() {  # settle_supernodes NAME...: all at once, so N SuperNodes wait 5 s, not 5N s
  # a SuperNode that cannot trust the SuperLink (TLS handshake: exit 305) exits within seconds: say
  # so instead of "started". On by default with TLS only: as a default without TLS the wait shifted
  # the timing of the SuperLink-restart fault test, which then hung once (docs/reliability.md)
  local wait="${FEDMLLM_NODE_SETTLE:-$([ -n "$TLS_DIR" ] && echo 5 || echo 0)}"
  [ "$wait" = 0 ] || settle "$wait" "$@"
}

start_all() {  # start N [key=value ...]
  local n=${1:-}; shift || true
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "start needs the number of SuperNodes, e.g. scripts/deploy.sh start 2"
  start_superlink
  local ranks=(${FEDMLLM_LORA_RANKS:-})
  [ ${#ranks[@]} = 0 ] || [ ${#ranks[@]} = "$n" ] || die "FEDMLLM_LORA_RANKS has ${#ranks[@]} ranks for $n SuperNodes; give one per node"
  local names=()
  for i in $(seq 0 $((n - 1))); do
    local extra=("$@")
    [ -n "${FEDMLLM_DATA_DIR:-}" ] && extra+=("data-dir=$FEDMLLM_DATA_DIR")
    [ ${#ranks[@]} = 0 ] || extra+=("lora-rank=${ranks[$i]}")
    [ "$NODE_AUTH" = 1 ] && register "$TLS_DIR/node-$i.key.pub"
    start_supernode "$i" "$n" "${extra[@]}"
    names+=("supernode-$i")
  done
  settle_supernodes "${names[@]}"
}

run_status() {  # run_status ID: pending, starting, running, finished:completed, finished:failed, ...; empty if unknown
  timeout 120 flwr ls "$CONN" --run-id "$1" --format json 2>/dev/null \
    | "${PYTHON:-python3}" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])' 2>/dev/null || true
}

run_app() {  # run "OVERRIDES": the app in this project on the SuperLink, streaming its log until the run ends
  write_connection
  cd "$ROOT"
  local out="$LOGS/run-app.out" rc=0
  flwr run . "$CONN" --run-config "overrides='${1:-}'" --stream 2>&1 | tee "$out" || rc=$?
  # The stream can end before the run does (its reconnect fails on a loaded SuperLink), so the
  # run's status, not the stream, says when it ended and how.
  local id status unknown=0 announced=""
  id="$(grep -o 'Successfully started run [0-9]*' "$out" | grep -o '[0-9]*$' | head -n 1 || true)"
  [ -n "$id" ] || return $((rc ? rc : 1))
  while :; do
    status="$(run_status "$id")"
    case "$status" in
      pending | starting | running)
        unknown=0
        [ -n "${announced:-}" ] || echo "deploy.sh: the log stream ended while run $id is $status; waiting for it (its log: flwr log $id $CONN)" >&2
        announced=1; sleep 15 ;;
      finished:completed) return 0 ;;
      finished:*) echo "deploy.sh: run $id $status; its log: flwr log $id $CONN --show" >&2; return 1 ;;
      *)  # flwr ls failed or answered nothing: retry a few times, then trust the stream's exit code
        unknown=$((unknown + 1))
        [ "$unknown" -lt 3 ] || { echo "deploy.sh: cannot read run $id's status (flwr ls $CONN --run-id $id)" >&2; return $((rc ? rc : 1)); }
        sleep 5 ;;
    esac
  done
}

stop_all() {  # every SuperNode and the SuperLink at once (one after another took 10 s each after a run)
  local names=() f
  for f in "$PIDS"/supernode-*.pid; do [ -e "$f" ] && names+=("$(basename "$f" .pid)"); done
  stop "${names[@]}" superlink
}

status() {
  local any=0
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    any=1
    local name; name="$(basename "$f" .pid)"
    if alive "$name"; then echo "$name: running (PID $(cat "$f"))"; else echo "$name: exited (log $LOGS/$name.log)"; fi
  done
  [ "$any" = 1 ] || echo "nothing started (pid files in $PIDS)"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  superlink) start_superlink ;;
  supernode) start_supernode "$@"; settle_supernodes "supernode-$1" ;;
  register) [ $# = 1 ] || die "register needs one public key file, e.g. node-2.key.pub"; register "$1" ;;
  start) start_all "$@" ;;
  run) run_app "${1:-}" ;;
  stop) stop_all ;;
  status) status ;;
  up)  # up N "OVERRIDES": start, run, stop (also on failure or Ctrl-C)
    [ $# -ge 1 ] || die "up needs N and the overrides, e.g. scripts/deploy.sh up 2 \"model=tiny-llava num_clients=2\""
    trap stop_all EXIT
    start_all "$1"
    run_app "${2:-}" ;;
  *) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || die "unknown command '$cmd'" ;;
esac
