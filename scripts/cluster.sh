#!/usr/bin/env bash
# A three-node signaling cluster on one machine, to try cross-node signaling:
#
#   scripts/cluster.sh start|stop|status
#
# start: nats-server on 127.0.0.1:4222 and three appliances, node1 on 127.0.0.1, node2 on
# 127.0.0.2 and node3 on 127.0.0.3 (HTTP/WS on port 8080, STUN/TURN on 3478 of each address).
# node1 runs the Key Server; node2 and node3 reach it over its signed HTTP API
# (ks.remote_url, the same shared key). Realm 1 is provisioned on every node. Actors that
# register on ws://127.0.0.N:8080/signaling/ws of different nodes discover each other and relay
# through NATS. Everything lives in CLUSTER_DIR (default target/cluster): configurations,
# data, logs (nodeN.log, nats.log) and PID files.
#
# Environment: ACTRIX (the binary; default target/release/actrix, else target/debug/actrix,
# built if neither exists), NATS_SERVER (default: nats-server on PATH or /usr/sbin),
# CLUSTER_DIR, NATS_PORT (4222), CLUSTER_BENCH=1 (signaling and AIS limits raised for
# bench/scenarios/signaling-cluster.toml, see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${CLUSTER_DIR:-$PWD/target/cluster}
NATS_PORT=${NATS_PORT:-4222}
NODES=(1 2 3)

actrix_bin() {
  if [ -n "${ACTRIX:-}" ]; then echo "$ACTRIX"; return; fi
  for b in target/release/actrix target/debug/actrix; do
    [ -x "$b" ] && { echo "$PWD/$b"; return; }
  done
  cargo build -q --bin actrix >&2
  echo "$PWD/target/debug/actrix"
}

nats_bin() {
  if [ -n "${NATS_SERVER:-}" ]; then echo "$NATS_SERVER"; return; fi
  command -v nats-server 2>/dev/null && return
  [ -x /usr/sbin/nats-server ] && { echo /usr/sbin/nats-server; return; }
  echo "cluster: nats-server not found (apt-get install nats-server, or scripts/deps.sh)" >&2
  exit 1
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_http() {
  local url=$1 _
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster: $url did not answer; see $DIR/*.log" >&2
  return 1
}

config() {
  local n=$1
  local ip=127.0.0.$n lo=$((50000 + (n - 1) * 1000))
  cat <<EOF
[node]
id = "node$n"
data_dir = "$DIR/node$n"
[cores]
pin = false
[stun]
listen = ["$ip:3478"]
[turn]
relay_port_range = "$lo-$((lo + 999))"
[http]
listen = "$ip:8080"
[ks]
shared_key = "$(cat "$DIR/shared_key")"
EOF
  if [ "$n" != 1 ]; then
    cat <<EOF
# The cluster's one Key Server runs on node1.
remote_url = "http://127.0.0.1:8080"
[services]
ks = false
EOF
  fi
  if [ "${CLUSTER_BENCH:-0}" = 1 ]; then
    # Limits raised for a load test from one machine (as scripts/bench-control.sh does).
    cat <<EOF
[ais]
rate_limit_burst = 10000000
rate_limit_refill_secs = 1
[signaling]
conn_rate_per_sec = 100000
conn_burst = 100000
max_conns_per_ip = 1000
msg_rate_per_sec = 10000
msg_burst = 10000
realm_cache_ms = 60000
EOF
  fi
  cat <<EOF
[cluster]
node_id = "node$n"
urls = ["nats://127.0.0.1:$NATS_PORT"]
EOF
}

# PUT /ais/realms/{id}, signed with the shared key (wire reference section 6).
put_realm() {
  python3 - "$1" "$(cat "$DIR/shared_key")" <<'EOF'
import base64, hashlib, hmac, json, sys, time, urllib.request, uuid
url, key = sys.argv[1], sys.argv[2]
body = json.dumps({"name": "cluster-demo", "status": "Normal"}).encode()
ts, nonce = str(int(time.time())), str(uuid.uuid4())
payload = f"ais_put_realm:1:{hashlib.sha256(body).hexdigest()}"
sig = hmac.new(key.encode(), (ts + nonce + payload).encode(), hashlib.sha256).digest()
req = urllib.request.Request(url + "/ais/realms/1", data=body, method="PUT", headers={
    "content-type": "application/json", "x-actrix-timestamp": ts,
    "x-actrix-nonce": nonce, "x-actrix-signature": base64.b64encode(sig).decode()})
with urllib.request.urlopen(req, timeout=5) as r:
    r.read()
EOF
}

start() {
  mkdir -p "$DIR"
  [ -f "$DIR/shared_key" ] || head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$DIR/shared_key"
  local actrix nats
  actrix=$(actrix_bin)
  nats=$(nats_bin)
  if ! alive "$DIR/nats.pid"; then
    "$nats" -a 127.0.0.1 -p "$NATS_PORT" >"$DIR/nats.log" 2>&1 &
    echo $! >"$DIR/nats.pid"
  fi
  for n in "${NODES[@]}"; do
    alive "$DIR/node$n.pid" && continue
    mkdir -p "$DIR/node$n"
    config "$n" >"$DIR/node$n.toml"
    ACTRIX_LOG=${ACTRIX_LOG:-info} "$actrix" run -c "$DIR/node$n.toml" >"$DIR/node$n.log" 2>&1 &
    echo $! >"$DIR/node$n.pid"
    # node1 first: the others fetch their keys from its KS.
    wait_http "http://127.0.0.$n:8080/signaling/health"
  done
  for n in "${NODES[@]}"; do
    put_realm "http://127.0.0.$n:8080"
  done
  status
}

stop() {
  local p
  for p in "$DIR"/node*.pid "$DIR"/nats.pid; do
    [ -f "$p" ] || continue
    if alive "$p"; then
      kill "$(cat "$p")" 2>/dev/null || true
    fi
    rm -f "$p"
  done
  echo "cluster: stopped"
}

status() {
  local up=0
  if alive "$DIR/nats.pid"; then
    echo "nats   127.0.0.1:$NATS_PORT  pid $(cat "$DIR/nats.pid")"
  else
    echo "nats   down"
  fi
  for n in "${NODES[@]}"; do
    if alive "$DIR/node$n.pid"; then
      up=$((up + 1))
      local m
      m=$(curl -fsS "http://127.0.0.$n:8080/metrics" 2>/dev/null |
        awk '/^actrix_signaling_cluster_(connected|nodes|remote_actors) /{sub("actrix_signaling_cluster_","",$1); printf "%s=%s ", $1, $2}
             /^actrix_signaling_registry_entries /{printf "local_actors=%s ", $2}')
      echo "node$n  ws://127.0.0.$n:8080/signaling/ws  pid $(cat "$DIR/node$n.pid")  $m"
    else
      echo "node$n  down"
    fi
  done
  [ "$up" -eq ${#NODES[@]} ]
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) sed -n 2,17p "$0"; exit 2 ;;
esac
