#!/usr/bin/env bash
# The control thread's services under load: KS secret fetches and key generation, AIS
# registrations, and the signaling hub (10,000 WebSocket connections, 20,000 envelopes/s).
# Starts the appliance with its control thread pinned to SERVER_CORE (1) and its shard on
# GEN_CORE (0, idle during these scenarios), and the load generator on GEN_CORE.
#
#   scripts/bench-control.sh [--quick] [--out DIR] [--scenarios "a b ..."] [--no-build]
#
# --quick scales durations by 0.25 and holds 2,000 connections instead of 10,000.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TIME_SCALE=1
OUT=""
SCENARIOS="ks-secret ks-generate ais-register ais-register-v4 signaling"
BUILD=1
QUICK=0
SERVER_CORE=${SERVER_CORE:-1}
GEN_CORE=${GEN_CORE:-0}
STUN_PORT=${STUN_PORT:-34781}
HTTP_PORT=${HTTP_PORT:-34881}

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; TIME_SCALE=0.25; shift ;;
    --out) OUT=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "bench-control: unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$ROOT/target/bench-control/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ "$BUILD" = 1 ]; then
  cargo build --release -q -p actrix -p actrix-bench
fi
ACTRIX=$ROOT/target/release/actrix
BENCH=$ROOT/target/release/actrix-bench
for b in "$ACTRIX" "$BENCH"; do
  [ -x "$b" ] || { echo "bench-control: $b is missing (build it or drop --no-build)" >&2; exit 2; }
done

SCEN_ARGS=()
for s in $SCENARIOS; do
  f=$ROOT/bench/scenarios/$s.toml
  [ -f "$f" ] || { echo "bench-control: no scenario $f" >&2; exit 2; }
  if [ "$QUICK" = 1 ] && [ "$s" = signaling ]; then
    sed -e 's/^connections = 10000/connections = 2000/' "$f" > "$OUT/signaling.toml"
    f=$OUT/signaling.toml
  fi
  SCEN_ARGS+=(-s "$f")
done

# Limits raised for a load test from one machine: the AIS per-IP bucket and the signaling
# per-IP and per-connection rates (the bench is a handful of source addresses, not a crowd).
cat > "$OUT/actrix.toml" <<CFG
[node]
data_dir = "$OUT/actrix-data"
[cores]
shards = [$GEN_CORE]
control = $SERVER_CORE
[stun]
listen = ["127.0.0.1:$STUN_PORT"]
[turn]
relay_addresses = ["127.0.0.1"]
relay_port_range = "62000-62999"
[http]
listen = "127.0.0.1:$HTTP_PORT"
[ais]
rate_limit_burst = 10000000
rate_limit_refill_secs = 1
[signaling]
conn_rate_per_sec = 100000
conn_burst = 100000
max_conns_per_ip = 1000
max_conns = 19000
msg_rate_per_sec = 10000
msg_burst = 10000
idle_timeout_secs = 600
auth_timeout_secs = 600
realm_cache_ms = 60000
CFG
mkdir -p "$OUT/actrix-data"
"$ACTRIX" check -c "$OUT/actrix.toml" >/dev/null

RUST_LOG=warn "$ACTRIX" run -c "$OUT/actrix.toml" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT INT TERM
healthy() {
  python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
    "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1
}
for _ in $(seq 1 100); do healthy && break; sleep 0.1; done
healthy || { echo "bench-control: the appliance did not come up" >&2; tail -20 "$OUT/server.log" >&2; exit 1; }

"$BENCH" run "${SCEN_ARGS[@]}" --server "127.0.0.1:$STUN_PORT" --label actrix \
  --http "http://127.0.0.1:$HTTP_PORT" --shared-key-file "$OUT/actrix-data/shared_key" \
  --server-pid "$SERVER_PID" --core "$GEN_CORE" --time-scale "$TIME_SCALE" --out "$OUT"
