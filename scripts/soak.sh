#!/usr/bin/env bash
# Soak (reliability checklist C6): steady relay traffic, allocation churn and periodic floods
# against the release appliance for a configurable time, with the server's resident memory,
# descriptors, allocations, timers and queue depths sampled after every round against their
# baseline. Not part of the test command (it runs for as long as asked).
#
#   scripts/soak.sh --minutes 60            # the one-hour soak; figures in the README
#   scripts/soak.sh --seconds 120 --round 40   # a short check of the script itself
#
# Options:
#   --seconds N | --minutes N   how long to run the rounds (default 3600 s)
#   --round N     seconds per round (default 60): relay for half of it, churn for a quarter, a
#                 spoofed-source flood for 5 s (needs root: raw socket), then 10 s of quiet
#                 before the sample
#   --flood-pps N flood rate (default 20000)
#   --out DIR     where the samples (soak.csv), the bench results of each round and the
#                 summary go (default soak-out/)
#
# Each sample is taken in the same state as the baseline (every load stopped, 10 s of quiet),
# so a figure that keeps growing from one sample to the next is a leak. The summary compares
# the last sample and the largest with the baseline and prints each round's relay p99.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."

secs=3600
round=60
flood_pps=20000
out=soak-out
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) secs=$2; shift 2 ;;
    --minutes) secs=$(( $2 * 60 )); shift 2 ;;
    --round) round=$2; shift 2 ;;
    --flood-pps) flood_pps=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$self"; exit 0 ;;
    *) echo "soak.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$round" -ge 30 ] || { echo "soak.sh: --round must be at least 30 s" >&2; exit 2; }

ACTRIX=${ACTRIX:-target/release/actrix}
BENCH=${ACTRIX_BENCH:-target/release/actrix-bench}
if [ ! -x "$ACTRIX" ] || [ ! -x "$BENCH" ]; then
  cargo build --release -p actrix -p actrix-bench
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
pid=""
cleanup() {
  [ -z "$pid" ] || { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=="udp" else socket.SOCK_STREAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"
}
port=$(free_port udp)
http=$(free_port tcp)
cat > "$work/actrix.toml" <<EOF
[node]
data_dir = "$work/data"
[cores]
pin = false
[stun]
listen = ["127.0.0.1:$port"]
bindings_per_source_per_sec = 1000000
# Above the ephemeral port range (the listener port is picked from it).
[turn]
relay_port_range = "61000-64999"
allow_peers = ["127.0.0.0/8"]
identity_credentials = false
users = [{ name = "soak", password = "soak-password" }]
rest_secrets = ["soak-rest-secret-0123456789"]
max_allocations_per_user = 100000
challenges_per_source_per_sec = 100000
[http]
listen = "127.0.0.1:$http"
EOF
"$ACTRIX" check -c "$work/actrix.toml" >/dev/null
"$ACTRIX" run -c "$work/actrix.toml" 2>"$out/actrix.log" &
pid=$!
for _ in $(seq 100); do grep -q "actrix ready" "$out/actrix.log" && break; sleep 0.1; done
grep -q "actrix ready" "$out/actrix.log" || { tail -n 30 "$out/actrix.log"; exit 1; }

relay_secs=$(( round / 2 ))
churn_secs=$(( round / 4 ))
cat > "$work/relay.toml" <<EOF
name = "soak-relay"
kind = "relay"
description = "soak: steady ChannelData relay"
[relay]
clients = 8
peers = 8
mode = "channel"
payload = 100
duration_secs = $relay_secs.0
offered_pps = 8000
drain_ms = 500
max_loss = 0.05
EOF
cat > "$work/churn.toml" <<EOF
name = "soak-churn"
kind = "churn"
description = "soak: allocation churn"
[churn]
concurrency = 8
duration_secs = $churn_secs.0
rto_ms = 500
attempts = 4
new_socket_per_cycle = true
peer = "127.0.0.1:9"
source_ips = 1024
max_failure = 0.05
EOF
cat > "$work/flood.toml" <<EOF
name = "soak-flood"
kind = "flood"
description = "soak: spoofed-source Allocates"
[flood]
pps = $flood_pps
duration_secs = 5.0
legit_clients = 2
max_rss_growth_mb = 64.0
min_legit_success = 0.0
EOF

metric_sum() { # NAME: the sum of a metric's series on /metrics
  curl -s "http://127.0.0.1:$http/metrics" | awk -v n="$1" '$1 ~ "^"n"({|$)" {s += $2} END {printf "%d", s}'
}
sample() { # ROUND
  local rss fds
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
  fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
  echo "$1,$(date +%s),$rss,$fds,$(metric_sum actrix_allocations_active),$(metric_sum actrix_timers_pending),$(metric_sum actrix_reservations_active),$(metric_sum actrix_identity_queue),$(metric_sum actrix_http_connections_open),$(metric_sum actrix_signaling_connections_open),$(metric_sum actrix_relayed_packets_total)"
}
bench() { # SCENARIO ROUND
  "$BENCH" run -q --no-pin -s "$work/$1.toml" --server "127.0.0.1:$port" \
    --user soak --password soak-password --server-pid "$pid" --out "$out/round-$2-$1" \
    >/dev/null 2>&1 || echo "round $2: $1 reported a failure (see $out/round-$2-$1)" >> "$out/notes.txt"
}
quiet() { sleep 10; }

echo "round,unix,rss_kb,fds,allocations,timers,reservations,identity_queue,http_open,signaling_open,relayed_total" > "$out/soak.csv"
: > "$out/notes.txt"
# Warm-up round, then the baseline.
bench relay 0
bench churn 0
quiet
sample 0 >> "$out/soak.csv"
flood=1
[ "$(id -u)" -eq 0 ] || { flood=0; echo "not root: no flood phases" >> "$out/notes.txt"; }
end=$(( $(date +%s) + secs ))
r=1
while [ "$(date +%s)" -lt "$end" ]; do
  kill -0 "$pid" 2>/dev/null || { echo "soak: the appliance exited" >&2; exit 1; }
  bench relay "$r"
  bench churn "$r"
  [ "$flood" = 0 ] || bench flood "$r"
  quiet
  sample "$r" >> "$out/soak.csv"
  echo "soak: round $r: $(tail -n 1 "$out/soak.csv")"
  r=$(( r + 1 ))
done

python3 - "$out" <<'PY' | tee "$out/summary.txt"
import csv, json, os, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "soak.csv"))))
base, last = rows[0], rows[-1]
cols = ["rss_kb", "fds", "allocations", "timers", "reservations", "identity_queue", "http_open", "signaling_open"]
print(f"soak: {len(rows) - 1} rounds over {int(last['unix']) - int(base['unix'])} s")
print(f"{'figure':16} {'baseline':>10} {'max':>10} {'last':>10}")
for c in cols:
    vals = [int(r[c]) for r in rows]
    print(f"{c:16} {vals[0]:>10} {max(vals):>10} {vals[-1]:>10}")
p99 = []
for r in rows[1:]:
    f = os.path.join(out, f"round-{r['round']}-relay", "results.json")
    try:
        s = json.load(open(f))["scenarios"][0]
        p99.append((s.get("latency") or {}).get("p99_us"))
    except Exception:
        p99.append(None)
print("relay p99 per round (us):", " ".join("-" if v is None else f"{v:.0f}" for v in p99))
growth = (int(last["rss_kb"]) - int(base["rss_kb"])) / 1024
print(f"RSS growth {growth:.1f} MB; descriptors {int(last['fds']) - int(base['fds']):+d}; "
      f"allocations {int(last['allocations']) - int(base['allocations']):+d}; "
      f"timers {int(last['timers']) - int(base['timers']):+d}")
notes = open(os.path.join(out, "notes.txt")).read().strip()
if notes:
    print("notes:\n" + notes)
PY
