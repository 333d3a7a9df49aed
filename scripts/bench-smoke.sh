#!/usr/bin/env bash
# Short runs through the appliance with the bench harness (REST credentials, the harness's
# own peers): a one-second ChannelData relay over UDP, the same with the clients over TCP and
# over TLS, a second of allocation churn over TLS and one of TLS handshakes, and a second of
# actr 0.4 AIS registrations with every Ed25519 signature verified (a few seconds in all).
# Fails when more is lost or fails than a scenario allows, or nothing was relayed.
# Part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ACTRIX=${ACTRIX_BIN:-$PWD/target/release/actrix}
BENCH=${ACTRIX_BENCH:-$PWD/target/release/actrix-bench}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tls=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
http=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/actrix.toml" <<EOF
[node]
data_dir = "$work/data"
[cores]
pin = false
[stun]
listen = ["127.0.0.1:$port"]
listen_tcp = ["127.0.0.1:$port"]
listen_tls = ["127.0.0.1:$tls"]
tls_cert = "$work/cert.pem"
tls_key = "$work/key.pem"
[turn]
relay_addresses = ["127.0.0.1"]
relay_port_range = "64000-64999"
allow_peers = ["127.0.0.0/8"]
rest_secrets = ["smoke-rest-secret-0123456789"]
shutdown_grace_secs = 1
[http]
listen = "127.0.0.1:$http"
[ais]
rate_limit_burst = 1000000
rate_limit_refill_secs = 1
EOF
"$ACTRIX" cert --self-signed --cert "$work/cert.pem" --key "$work/key.pem" >/dev/null
"$ACTRIX" run -c "$work/actrix.toml" 2>"$work/actrix.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "actrix ready" "$work/actrix.log" && break; sleep 0.1; done
grep -q "actrix ready" "$work/actrix.log" || { cat "$work/actrix.log"; exit 1; }
"$BENCH" run -q --no-pin -s bench/scenarios/smoke.toml \
  -s bench/scenarios/smoke-relay-tcp.toml -s bench/scenarios/smoke-relay-tls.toml \
  -s bench/scenarios/smoke-churn-tls.toml -s bench/scenarios/smoke-handshake-tls.toml \
  -s bench/scenarios/smoke-ais-v4.toml \
  --server "127.0.0.1:$port" --tcp "127.0.0.1:$port" --tls "127.0.0.1:$tls" \
  --http "http://127.0.0.1:$http" --shared-key-file "$work/data/shared_key" \
  --rest-secret smoke-rest-secret-0123456789 --server-pid "$pid" --out "$work/out"
cat "$work/out/summary.txt" 2>/dev/null || true
