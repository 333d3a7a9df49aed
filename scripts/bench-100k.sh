#!/usr/bin/env bash
# 100,000 concurrent allocations on one node, end to end: the appliance with shared relay
# sockets (io.relay_sockets = "shared": no file descriptor per allocation) on two relay
# addresses (127.0.0.2 and .3, ports 10000-64999: 110,000 relayed addresses), loaded by
# several actrix-bench processes at once (each holds at most ~15,000 client sockets, below a
# per-process open-file limit of 20,000). Waits until /metrics shows the target number of
# active allocations, then reads the server's RSS and open descriptors from /proc and writes
# a report (markdown + JSON). Needs root (the shared mode loads a BPF program).
#
#   scripts/bench-100k.sh [--allocations N] [--procs K] [--out DIR] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOTAL=100000
PROCS=7
OUT=""
BUILD=1
SERVER_CORE=${SERVER_CORE:-1}
GEN_CORE=${GEN_CORE:-0}
STUN_PORT=${STUN_PORT:-65100}
HTTP_PORT=${HTTP_PORT:-65101}
while [ $# -gt 0 ]; do
  case "$1" in
    --allocations) TOTAL=$2; shift 2 ;;
    --procs) PROCS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "bench-100k: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-100k: needs root (shared relay sockets load a BPF program)" >&2; exit 2; }
OUT=${OUT:-$ROOT/target/bench-100k/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/data"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
log() { echo "[bench-100k +$(( $(date +%s) - START ))s] $*" >&2; }
[ "$BUILD" = 1 ] && cargo build --release -q -p actrix -p actrix-bench
ACTRIX=$ROOT/target/release/actrix
BENCH=$ROOT/target/release/actrix-bench
PER=$(( (TOTAL + PROCS - 1) / PROCS ))

cat > "$OUT/actrix.toml" <<CFG
[node]
data_dir = "$OUT/data"
[cores]
shards = [$SERVER_CORE]
control = $GEN_CORE
[stun]
listen = ["127.0.0.1:$STUN_PORT"]
[turn]
relay_addresses = ["127.0.0.2", "127.0.0.3"]
relay_port_range = "10000-64999"
allow_peers = ["127.0.0.0/8"]
users = [{ name = "bench", password = "bench-password" }]
max_allocations = 1000000
max_allocations_per_user = 1000000
challenges_per_source_per_sec = 100000
[io]
relay_sockets = "shared"
[http]
listen = "127.0.0.1:$HTTP_PORT"
CFG
"$ACTRIX" check -c "$OUT/actrix.toml" >/dev/null
cat > "$OUT/idle-part.toml" <<SCN
name = "idle-part"
kind = "idle"
description = "one generator's share of the 100k allocations, held while the others set up theirs"
[idle]
allocations = $PER
concurrency = 64
hold_secs = 600.0
rto_ms = 1000
attempts = 6
source_ips = 1000
min_success = 0.99
SCN

PIDS=()
SERVER=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

RUST_LOG=info "$ACTRIX" run -c "$OUT/actrix.toml" >"$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" >/dev/null 2>&1 && break
  sleep 0.1
done
metric() { curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$SERVER/status"; }
fds() { find "/proc/$SERVER/fd" -mindepth 1 -maxdepth 1 | wc -l; }
RSS0=$(rss_kib)
FD0=$(fds)
log "server up (pid $SERVER, RSS $RSS0 KiB, $FD0 descriptors); $PROCS generators x $PER allocations"

T0=$(date +%s.%N)
for i in $(seq 1 "$PROCS"); do
  mkdir -p "$OUT/gen$i"
  taskset -c "$GEN_CORE" "$BENCH" run -s "$OUT/idle-part.toml" --server "127.0.0.1:$STUN_PORT" \
    --target turn --user bench --password bench-password --core "$GEN_CORE" --out "$OUT/gen$i" -q \
    >"$OUT/gen$i/stdout" 2>"$OUT/gen$i/stderr" &
  PIDS+=($!)
done

ACTIVE=0
for _ in $(seq 1 600); do
  ACTIVE=$(metric actrix_allocations_active)
  [ "$ACTIVE" -ge "$TOTAL" ] && break
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || { log "a generator exited early; see $OUT/gen*/stderr"; break 2; }
  done
  sleep 1
done
T1=$(date +%s.%N)
sleep 2
ACTIVE=$(metric actrix_allocations_active)
RSS1=$(rss_kib)
FD1=$(fds)
CREATED=$(metric actrix_allocations_created_total)
REFUSED=$(metric actrix_allocations_refused_capacity_total)
calc() { awk "BEGIN { print ($1) }"; }
SECS=$(calc "$T1 - $T0")
PER_ALLOC=$(calc "$ACTIVE > 0 ? ($RSS1 - $RSS0) * 1024 / $ACTIVE : 0")
RATE=$(calc "$ACTIVE / $SECS")
log "active $ACTIVE after $(printf %.1f "$SECS") s; RSS $RSS0 -> $RSS1 KiB; descriptors $FD0 -> $FD1"

# Relay through one of the allocations at the top of the range: a fresh client allocates
# (the 100,001st) and talks to a peer, proving the relay still works at this size.
cat > "$OUT/smoke.toml" <<SCN
name = "relay-at-100k"
kind = "relay"
description = "ChannelData through fresh allocations while 100k are held"
[relay]
clients = 2
peers = 2
mode = "channel"
payload = 100
duration_secs = 2.0
offered_pps = 2000
drain_ms = 300
max_loss = 0.001
SCN
set +e
taskset -c "$GEN_CORE" "$BENCH" run -s "$OUT/smoke.toml" --server "127.0.0.1:$STUN_PORT" \
  --target turn --user bench --password bench-password --core "$GEN_CORE" --out "$OUT/relay" -q \
  >"$OUT/relay.stdout" 2>"$OUT/relay.stderr"
RELAY_RC=$?
set -e
cat "$OUT/relay.stdout" >&2

cat > "$OUT/report.json" <<JSON
{"allocations_target": $TOTAL, "allocations_active": $ACTIVE, "allocations_created": $CREATED,
 "refused_capacity": $REFUSED, "setup_secs": $SECS, "setup_per_sec": $RATE,
 "rss_before_kib": $RSS0, "rss_after_kib": $RSS1, "rss_bytes_per_allocation": $PER_ALLOC,
 "fds_before": $FD0, "fds_after": $FD1, "generators": $PROCS, "relay_check_rc": $RELAY_RC,
 "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)", "kernel": "$(uname -r)"}
JSON
{
  echo "# 100k concurrent allocations (shared relay sockets)"
  echo
  echo "| figure | value |"
  echo "|---|---:|"
  echo "| active allocations (/metrics) | $ACTIVE of $TOTAL |"
  echo "| set up in | $(printf %.1f "$SECS") s ($(printf %.0f "$RATE")/s, $PROCS generator processes on one core) |"
  echo "| server RSS | $RSS0 KiB -> $RSS1 KiB |"
  echo "| RSS per allocation | $(printf %.0f "$PER_ALLOC") bytes |"
  echo "| server file descriptors | $FD0 -> $FD1 |"
  echo "| relay check with all of them held | $([ $RELAY_RC = 0 ] && echo PASS || echo FAIL) |"
} > "$OUT/report.md"
cat "$OUT/report.md"
log "done: $OUT/report.md"
[ "$ACTIVE" -ge "$TOTAL" ] && [ "$RELAY_RC" = 0 ]
