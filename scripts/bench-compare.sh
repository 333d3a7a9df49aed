#!/usr/bin/env bash
# Compare our appliance with coturn and the bare reference forwarder, same scenarios, same
# machine, alternating runs, fixed cores. Writes one comparison report (markdown + JSON).
#
#   scripts/bench-compare.sh [--quick] [--rounds N] [--out DIR] [--scenarios "a b ..."]
#                            [--no-build] [--variant NAME=BINARY[:BACKEND] ...] [--ours NAME]
#
# Defaults: 3 rounds, every scenario of bench/scenarios/ used for comparisons (under 10
# minutes on a 2-core VM). --quick: 1 round, durations scaled by 0.25 (under a minute once
# the binaries are built). Cores: the servers on SERVER_CORE (1), the load generator on
# GEN_CORE (0); override through the environment. Nothing else should run meanwhile: each
# scenario reports how much CPU other processes took ("contended" notes).
# ACTRIX_CONFIG_EXTRA: TOML appended to our appliance's configuration, to compare settings
# (e.g. ACTRIX_CONFIG_EXTRA=$'[io]\ncoalesce_us = 0'); ACTRIX_RELAY_ADDRESS: its relay address
# (127.0.0.1; use another loopback address such as 127.0.0.2 with io.relay_sockets = "shared",
# whose steering program would otherwise take the generator's own ephemeral ports).
# --variant: measure several builds or I/O backends of our appliance in the same rounds, e.g.
# --variant before=/tmp/old/actrix --variant mmsg=target/release/actrix:mmsg
# --variant glommio=target/release/actrix:glommio --ours mmsg (default: one variant "actrix",
# target/release/actrix on its default backend; --ours defaults to the first variant). The
# comparison gives ours over the reference, coturn and every other variant.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=3
TIME_SCALE=1
OUT=""
SCENARIOS="binding churn relay-channel-20k relay-channel-50k relay-channel relay-send relay-max idle"
BUILD=1
VARIANTS=()
OURS=""
SERVER_CORE=${SERVER_CORE:-1}
GEN_CORE=${GEN_CORE:-0}
ACTRIX_PORT=${ACTRIX_PORT:-34780}
COTURN_PORT=${COTURN_PORT:-34790}
REF_PORT=${REF_PORT:-34800}
HTTP_PORT=${HTTP_PORT:-34880}
# TURN over TCP shares each server's UDP port number; TURN over TLS has its own port.
ACTRIX_TLS_PORT=${ACTRIX_TLS_PORT:-34781}
COTURN_TLS_PORT=${COTURN_TLS_PORT:-34791}

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) ROUNDS=1; TIME_SCALE=0.25; shift ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --variant) VARIANTS+=("$2"); shift 2 ;;
    --ours) OURS=$2; shift 2 ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    *) echo "bench-compare: unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$ROOT/target/bench-compare/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
log() { echo "[bench-compare +$(( $(date +%s) - START ))s] $*" >&2; }

# --- prerequisites -------------------------------------------------------------------
if ! command -v turnserver >/dev/null 2>&1; then
  log "installing coturn"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq coturn >/dev/null
fi
command -v taskset >/dev/null || { echo "bench-compare: taskset (util-linux) is required" >&2; exit 2; }

if [ "$BUILD" = 1 ]; then
  log "building release binaries"
  cargo build --release -q -p actrix -p actrix-bench
fi
BENCH=$ROOT/target/release/actrix-bench
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=("actrix=$ROOT/target/release/actrix")
declare -A VBIN VBACKEND
VNAMES=()
for v in "${VARIANTS[@]}"; do
  name=${v%%=*}; rest=${v#*=}
  if [ "$name" = "$v" ] || [ -z "$name" ]; then
    echo "bench-compare: --variant takes NAME=BINARY[:BACKEND], got $v" >&2; exit 2
  fi
  case "$name" in reference|coturn) echo "bench-compare: variant name $name is taken" >&2; exit 2 ;; esac
  bin=${rest%%:*}; backend=""
  [ "$bin" != "$rest" ] && backend=${rest#*:}
  VBIN[$name]=$bin; VBACKEND[$name]=$backend; VNAMES+=("$name")
done
OURS=${OURS:-${VNAMES[0]}}
[ -n "${VBIN[$OURS]:-}" ] || { echo "bench-compare: --ours $OURS is not a variant" >&2; exit 2; }
for b in "$BENCH" "${VBIN[@]}"; do
  [ -x "$b" ] || { echo "bench-compare: $b is missing (build it or drop --no-build)" >&2; exit 2; }
done

SCEN_ARGS=()
for s in $SCENARIOS; do
  f=$ROOT/bench/scenarios/$s.toml
  [ -f "$f" ] || { echo "bench-compare: no scenario $f" >&2; exit 2; }
  SCEN_ARGS+=(-s "$f")
done

# --- servers ---------------------------------------------------------------------------
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap cleanup EXIT INT TERM

port_free() { ! "$BENCH" find-pid --port "$1" >/dev/null 2>&1; }

# Wait until a process holds UDP port $1 (at most 10 s); prints its pid.
wait_port() {
  for _ in $(seq 1 100); do
    if pid=$("$BENCH" find-pid --port "$1" 2>/dev/null); then echo "$pid"; return 0; fi
    sleep 0.1
  done
  return 1
}

# write_actrix_config NAME: the configuration of variant NAME (its backend, if given).
write_actrix_config() {
  local name=$1 io=""
  [ -n "${VBACKEND[$name]}" ] && io=$'[io]\nbackend = "'"${VBACKEND[$name]}"'"'
  cat > "$OUT/actrix-$name.toml" <<EOF
[node]
data_dir = "$OUT/actrix-data-$name"
[cores]
shards = [$SERVER_CORE]
control = $GEN_CORE
[stun]
listen = ["127.0.0.1:$ACTRIX_PORT"]
listen_tcp = ["127.0.0.1:$ACTRIX_PORT"]
listen_tls = ["127.0.0.1:$ACTRIX_TLS_PORT"]
tls_cert = "$OUT/tls-cert.pem"
tls_key = "$OUT/tls-key.pem"
# The stream scenarios spread their connections over loopback sources, up to a few
# thousand at once (idle-tls).
max_connections_per_ip = 1024
# The load generator is one source: lift the per-source Binding budget (a reflection guard).
bindings_per_source_per_sec = 4000000000
[turn]
relay_addresses = ["${ACTRIX_RELAY_ADDRESS:-127.0.0.1}"]
allow_peers = ["127.0.0.0/8"]
users = [{ name = "bench", password = "bench-password" }]
rest_secrets = ["bench-rest-secret-0123456789"]
max_allocations_per_user = 1000000
[http]
listen = "127.0.0.1:$HTTP_PORT"
${io}
${ACTRIX_CONFIG_EXTRA:-}
EOF
  mkdir -p "$OUT/actrix-data-$name"
  "${VBIN[$name]}" check -c "$OUT/actrix-$name.toml" >/dev/null
}

# start_server NAME LOGFILE: starts it pinned, sets SERVER_PID and PORT.
start_server() {
  local name=$1 logf=$2
  case "$name" in
    reference)
      PORT=$REF_PORT TLS_PORT=""
      port_free "$PORT" || { echo "bench-compare: UDP $PORT is in use" >&2; exit 2; }
      taskset -c "$SERVER_CORE" "$BENCH" reference --listen "127.0.0.1:$PORT" --core "$SERVER_CORE" \
        >"$logf" 2>&1 &
      SERVER_PID=$! ;;
    coturn)
      PORT=$COTURN_PORT TLS_PORT=$COTURN_TLS_PORT
      port_free "$PORT" || { echo "bench-compare: UDP $PORT is in use" >&2; exit 2; }
      taskset -c "$SERVER_CORE" turnserver -n --no-cli --listening-ip=127.0.0.1 \
        --listening-port="$PORT" --relay-ip=127.0.0.1 --min-port=40000 --max-port=48000 \
        --lt-cred-mech --user=bench:bench-password --realm=actor-rtc.local \
        --allow-loopback-peers --tls-listening-port="$COTURN_TLS_PORT" \
        --cert="$OUT/tls-cert.pem" --pkey="$OUT/tls-key.pem" --no-dtls --no-stdout-log --simple-log \
        --log-file="$logf" --pidfile="$OUT/coturn.pid" >/dev/null 2>&1 &
      SERVER_PID=$! ;;
    *)
      PORT=$ACTRIX_PORT TLS_PORT=$ACTRIX_TLS_PORT
      port_free "$PORT" || { echo "bench-compare: UDP $PORT is in use" >&2; exit 2; }
      RUST_LOG=warn "${VBIN[$name]}" run -c "$OUT/actrix-$name.toml" >"$logf" 2>&1 &
      SERVER_PID=$! ;;
  esac
  local found
  if ! found=$(wait_port "$PORT"); then
    echo "bench-compare: $name did not open UDP $PORT; log:" >&2
    tail -20 "$logf" >&2 || true
    exit 1
  fi
  # The process holding the port is the one measured (it may differ from $! if it forks).
  SERVER_PID=$found
}

# --- rounds: every target once per round, the order rotated every round -----------------
# One self-signed pair (ECDSA P-256) for both servers' TLS listeners.
"${VBIN[$OURS]}" cert --self-signed --cert "$OUT/tls-cert.pem" --key "$OUT/tls-key.pem" >/dev/null
for name in "${VNAMES[@]}"; do write_actrix_config "$name"; done
TARGETS=(reference coturn "${VNAMES[@]}")
NT=${#TARGETS[@]}
FAILED_OURS=0
COMPARE_ARGS=()
for round in $(seq 1 "$ROUNDS"); do
  for i in $(seq 0 $((NT - 1))); do
    name=${TARGETS[$(( (i + round - 1) % NT ))]}
    dir=$OUT/round$round/$name
    mkdir -p "$dir"
    log "round $round/$ROUNDS: $name"
    start_server "$name" "$dir/server.log"
    sleep 0.5
    AUTH=(--user bench --password bench-password)
    KIND=turn
    STREAMS=(--tcp "127.0.0.1:$PORT" --tls "127.0.0.1:$TLS_PORT")
    [ "$name" = reference ] && { AUTH=(); KIND=reference; STREAMS=(); }
    set +e
    "$BENCH" run "${SCEN_ARGS[@]}" --server "127.0.0.1:$PORT" --target "$KIND" --label "$name" \
      "${STREAMS[@]}" "${AUTH[@]}" --server-pid "$SERVER_PID" --core "$GEN_CORE" --time-scale "$TIME_SCALE" \
      --out "$dir" -q >"$dir/summary.stdout" 2>"$dir/bench.stderr"
    rc=$?
    set -e
    cat "$dir/summary.stdout"
    if [ $rc -ne 0 ]; then
      log "$name: some scenario failed (exit $rc); see $dir/bench.stderr"
      grep FAILED "$dir/bench.stderr" >&2 || true
      [ -n "${VBIN[$name]:-}" ] && FAILED_OURS=1
    fi
    cleanup
    sleep 0.5
    [ -f "$dir/results.json" ] && COMPARE_ARGS+=("--run=$name=$dir")
  done
done

log "writing the comparison"
RATIOS=()
for name in "${VNAMES[@]}"; do
  if [ "$name" != "$OURS" ]; then RATIOS+=(--ratio-to "$name"); fi
done
"$BENCH" compare "${COMPARE_ARGS[@]}" --ours "$OURS" --reference reference --coturn coturn \
  "${RATIOS[@]}" --out "$OUT" >/dev/null
cat "$OUT/comparison.md"
log "done in $(( $(date +%s) - START ))s: $OUT/comparison.md, $OUT/comparison.json"
if grep -q "contended" "$OUT"/round*/*/summary.txt 2>/dev/null; then
  log "WARNING: other processes competed for the CPU during some scenarios (see the notes)"
fi
exit $FAILED_OURS
