#!/usr/bin/env bash
# Per-core cost as shards are added: the same fixed offered load (bench/scenarios/relay-scale.toml,
# 64 clients x 2 peers, 80k relayed packets/s) against the appliance with one shard and with
# two, alternating, and the server CPU per relayed packet of each (from /proc/PID/stat).
# On a machine with cores to spare, set SHARDS_TWO to two free cores and GEN_CORE to a third
# and raise the offered rate to compare throughput instead.
#
#   scripts/bench-scaling.sh [--rounds N] [--out DIR] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=3
OUT=""
BUILD=1
SHARDS_ONE=${SHARDS_ONE:-1}
SHARDS_TWO=${SHARDS_TWO:-0, 1}
STUN_PORT=${STUN_PORT:-34782}
HTTP_PORT=${HTTP_PORT:-34882}
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "bench-scaling: unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$ROOT/target/bench-scaling/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ "$BUILD" = 1 ] && cargo build --release -q -p actrix -p actrix-bench
ACTRIX=$ROOT/target/release/actrix
BENCH=$ROOT/target/release/actrix-bench

PID=""
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; wait 2>/dev/null || true' EXIT INT TERM
run_one() { # run_one LABEL "CORES" ROUND
  local dir=$OUT/$1-$3
  mkdir -p "$dir/data"
  cat > "$dir/actrix.toml" <<CFG
[node]
data_dir = "$dir/data"
[cores]
shards = [$2]
control = "auto"
[stun]
listen = ["127.0.0.1:$STUN_PORT"]
[turn]
relay_addresses = ["127.0.0.1"]
relay_port_range = "50000-59999"
allow_peers = ["127.0.0.0/8"]
users = [{ name = "bench", password = "bench-password" }]
max_allocations_per_user = 100000
[http]
listen = "127.0.0.1:$HTTP_PORT"
CFG
  RUST_LOG=warn "$ACTRIX" run -c "$dir/actrix.toml" >"$dir/server.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 50); do "$BENCH" find-pid --port "$STUN_PORT" >/dev/null 2>&1 && break; sleep 0.1; done
  # The generator is not pinned: with two shards on a 2-core machine it shares their cores.
  "$BENCH" run -q -s "$ROOT/bench/scenarios/relay-scale.toml" --server "127.0.0.1:$STUN_PORT" \
    --user bench --password bench-password --server-pid "$PID" --no-pin --out "$dir" \
    >"$dir/summary.stdout" 2>"$dir/bench.stderr" || true
  kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""
}
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then run_one one "$SHARDS_ONE" "$r"; run_one two "$SHARDS_TWO" "$r"
  else run_one two "$SHARDS_TWO" "$r"; run_one one "$SHARDS_ONE" "$r"; fi
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for label in ("one", "two"):
    v = []
    for r in range(1, rounds + 1):
        try:
            s = json.load(open(f"{out}/{label}-{r}/results.json"))["scenarios"][0]
        except (OSError, KeyError, IndexError, ValueError):
            continue
        if s.get("passed") and "cpu_us_per_relayed_pkt" in s["metrics"]:
            v.append((s["metrics"]["cpu_us_per_relayed_pkt"], s["metrics"].get("relayed_pps", 0)))
    rows[label] = v
lines = ["| shards | rounds passed | relayed pkt/s (median) | server CPU per relayed packet, us (median [min-max]) |", "|---|---:|---:|---:|"]
med = {}
for label, v in rows.items():
    if not v:
        lines.append(f"| {label} | 0 | - | - |"); continue
    c = [x[0] for x in v]; p = [x[1] for x in v]
    med[label] = statistics.median(c)
    lines.append(f"| {label} | {len(v)} | {statistics.median(p):.0f} | {med[label]:.3f} [{min(c):.3f}-{max(c):.3f}] |")
if len(med) == 2:
    lines.append(f"\nCPU per packet, two shards / one shard: {med['two'] / med['one']:.2f}x")
text = "\n".join(lines) + "\n"
open(f"{out}/scaling.md", "w").write(text)
print(text)
PY
