#!/usr/bin/env bash
# A one-second ChannelData relay through the appliance with the bench harness (REST
# credentials, the harness's own peers): fails when more is lost than the scenario allows or
# nothing was relayed. Part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ACTRIX=${ACTRIX_BIN:-$PWD/target/release/actrix}
BENCH=${ACTRIX_BENCH:-$PWD/target/release/actrix-bench}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
http=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/actrix.toml" <<EOF
[node]
data_dir = "$work/data"
[cores]
pin = false
[stun]
listen = ["127.0.0.1:$port"]
[turn]
relay_addresses = ["127.0.0.1"]
relay_port_range = "64000-64999"
allow_peers = ["127.0.0.0/8"]
rest_secrets = ["smoke-rest-secret-0123456789"]
shutdown_grace_secs = 1
[http]
listen = "127.0.0.1:$http"
EOF
"$ACTRIX" run -c "$work/actrix.toml" 2>"$work/actrix.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "actrix ready" "$work/actrix.log" && break; sleep 0.1; done
grep -q "actrix ready" "$work/actrix.log" || { cat "$work/actrix.log"; exit 1; }
"$BENCH" run -q --no-pin -s bench/scenarios/smoke.toml --server "127.0.0.1:$port" \
  --rest-secret smoke-rest-secret-0123456789 --server-pid "$pid" --out "$work/out"
cat "$work/out/summary.txt" 2>/dev/null || true
