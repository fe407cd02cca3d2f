# Process helpers shared by scripts/deploy.sh and scripts/flwr_sim.sh (sourced, not run).
# Each process runs in its own process group with its PID in $PIDS/NAME.pid and its output in
# $LOGS/NAME.log; callers set PIDS and LOGS.

die() { echo "error: $*" >&2; exit 2; }

alive() {  # a zombie (killed, not yet reaped) counts as gone
  [ -f "$PIDS/$1.pid" ] || return 1
  local stat; stat="$(ps -o stat= -p "$(cat "$PIDS/$1.pid")" 2>/dev/null)" || return 1
  [[ "$stat" != Z* ]]
}

launch() {  # launch NAME CMD...: own process group (setsid), PID in $PIDS/NAME.pid, log in $LOGS/NAME.log
  local name=$1; shift
  alive "$name" && die "$name is already running (PID $(cat "$PIDS/$name.pid")); stop it first (scripts/deploy.sh stop, or kill -- -PID)"
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
}

settle() {  # settle SECONDS NAME...: die with its log and exit code if a NAME exits within SECONDS of starting
  local seconds=$1 name pid code; shift
  for _ in $(seq "$((seconds * 5))"); do
    for name in "$@"; do
      pid="$(cat "$PIDS/$name.pid")"
      kill -0 "$pid" 2>/dev/null && continue
      code=0; wait "$pid" 2>/dev/null || code=$?
      tail -n 20 "$LOGS/$name.log" >&2 || true
      rm -f "$PIDS/$name.pid"
      local flwr; flwr="$(grep -o 'Exit Code: [0-9]*' "$LOGS/$name.log" | tail -n 1 || true)"
      die "$name exited at start with code $code${flwr:+ (Flower: $flwr; 305 is a failed TLS handshake with the SuperLink)}; its log: $LOGS/$name.log"
    done
    sleep 0.2
  done
}

stop_one() { stop "$1"; }

stop() {  # stop NAME...: TERM every process group at once, KILL the ones still up after 10 s
  local name pid pids=() names=()
  for name in "$@"; do
    [ -f "$PIDS/$name.pid" ] || continue
    pid="$(cat "$PIDS/$name.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || true
    pids+=("$pid"); names+=("$name")
  done
  [ "${#pids[@]}" -gt 0 ] || return 0
  for _ in $(seq 50); do  # a SuperNode takes 2-3 s to leave the SuperLink, longer after a run
    local up=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && up=1; done
    [ "$up" = 0 ] && break
    sleep 0.2
  done
  for i in "${!pids[@]}"; do
    kill -KILL -- "-${pids[$i]}" 2>/dev/null || true
    rm -f "$PIDS/${names[$i]}.pid"
    echo "stopped ${names[$i]} (PID ${pids[$i]})"
  done
}

wait_port() {  # wait_port NAME HOST PORT: until it accepts connections (its process must stay up)
  local name=$1 host=$2 port=$3
  for _ in $(seq 200); do
    alive "$name" || { tail -n 20 "$LOGS/$name.log" >&2 || true; die "$name exited; its log: $LOGS/$name.log"; }
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && return 0
    sleep 0.3
  done
  die "$name did not open $host:$port within a minute; its log: $LOGS/$name.log"
}
