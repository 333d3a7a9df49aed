#!/usr/bin/env bash
# User-space instructions per relayed packet in the shard thread, counted by callgrind (which
# the VM's steal and frequency do not move): the appliance runs under
# `valgrind --tool=callgrind --separate-threads=yes`, one light relay scenario is played
# against it (bench/scenarios/callgrind-send.toml and callgrind-channel.toml: 1,000 datagrams/s
# offered, about one per round, so per-round work is not amortized), and the busiest thread's
# instruction total is divided by the datagrams relayed.
#
#   scripts/bench-callgrind.sh [NAME=BINARY ...]     (default: actrix=target/release/actrix)
#
# Prints one line per binary and scenario. Needs valgrind (apt-get install valgrind) and a
# release build of actrix-bench. Ports 35780 (STUN/TURN) and 35880 (HTTP) must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=$ROOT/target/release/actrix-bench
command -v valgrind >/dev/null || { echo "bench-callgrind: valgrind is required" >&2; exit 2; }
[ -x "$BENCH" ] || { echo "bench-callgrind: build actrix-bench (cargo build --release -p actrix-bench)" >&2; exit 2; }
[ $# -gt 0 ] || set -- "actrix=$ROOT/target/release/actrix"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

for v in "$@"; do
  name=${v%%=*}; bin=${v#*=}
  [ -x "$bin" ] || { echo "bench-callgrind: $bin is missing" >&2; exit 2; }
  for scen in callgrind-send callgrind-channel; do
    dir=$OUT/$name-$scen
    mkdir -p "$dir/data"
    cat > "$dir/actrix.toml" <<T
[node]
data_dir = "$dir/data"
[cores]
shards = [1]
control = 0
[stun]
listen = ["127.0.0.1:35780"]
[turn]
relay_addresses = ["127.0.0.1"]
allow_peers = ["127.0.0.0/8"]
users = [{ name = "bench", password = "bench-password" }]
max_allocations_per_user = 1000000
shutdown_grace_secs = 0
[http]
listen = "127.0.0.1:35880"
T
    RUST_LOG=warn valgrind --tool=callgrind --separate-threads=yes \
      --callgrind-out-file="$dir/cg.out.%p" "$bin" run -c "$dir/actrix.toml" >"$dir/log" 2>&1 &
    vpid=$!
    for _ in $(seq 1 150); do "$BENCH" find-pid --port 35780 >/dev/null 2>&1 && break; sleep 0.2; done
    sleep 1
    "$BENCH" run -s "bench/scenarios/$scen.toml" --server 127.0.0.1:35780 --target turn \
      --label "$name" --user bench --password bench-password --server-pid 0 --core 0 \
      --out "$dir/bench" -q >"$dir/bench.txt" 2>&1 || true
    pid=$("$BENCH" find-pid --port 35780)
    kill -INT "$pid"; sleep 1; kill -INT "$pid" 2>/dev/null || true
    wait "$vpid" || true
    relayed=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['scenarios'][0]['metrics']; print(int(m['peer_rx'] + m['client_rx']))" "$dir/bench/results.json")
    best=0
    for f in "$dir"/cg.out.*-*; do
      t=$(awk '/^summary:/ {print $2}' "$f")
      [ "${t:-0}" -gt "$best" ] && best=$t
    done
    echo "$name $scen: $best instructions in the shard thread, $relayed relayed, $((best / relayed)) per relayed packet"
  done
done
