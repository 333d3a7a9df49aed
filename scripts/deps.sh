#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian machine: coturn's test clients
# (turnutils_uclient, turnutils_stunclient, turnutils_peer), iproute2 for network namespaces,
# libfaketime for the clock-step test, Chromium for the browser tests (with openssl and NSS's
# certutil for their TLS certificates), the shell linter, and the Python packages of the
# end-to-end tests (aioice, pytest). Idempotent and quiet.
set -euo pipefail

need_apt=()
command -v turnutils_uclient >/dev/null 2>&1 || need_apt+=(coturn)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# libfaketime: the clock-step test (relay/tests/clock_step.rs) steps the appliance's wall clock.
[ -f /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need_apt+=(faketime)
# Headless Chromium drives the diagnostics page end to end; shellcheck lints the scripts.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The browser tests of TURN over TLS make a test CA (openssl) and have Chromium trust it through
# an NSS database of its own (certutil, from libnss3-tools).
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v certutil >/dev/null 2>&1 || need_apt+=(libnss3-tools)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
# nats-server: the cluster tests (relay/tests/cluster.rs) and scripts/cluster.sh run a real NATS
# bus (Debian installs it in /usr/sbin).
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
# protoc: the published actr-protocol crates run it in their build scripts (0.1.7 in a
# compatibility test, 0.4.21 in signaling/compat04). The appliance's own message types need no
# protoc: actrix-wire compiles its vendored .proto files with protox.
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# Its .proto files import google/protobuf/descriptor.proto, which protobuf-compiler only
# recommends (libprotobuf-dev); without it protoc fails on a --no-install-recommends machine.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: need root to install: ${need_apt[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# coturn's package enables a system service on some images; the tests never use it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet coturn 2>/dev/null; then
  systemctl stop coturn || true
fi
pkill -x turnserver 2>/dev/null || true
# Likewise nats-server's package may start a system service on port 4222; the tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nats-server 2>/dev/null; then
  systemctl stop nats-server || true
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import aioice, pytest' >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check -r "$(dirname "$0")/requirements-test.txt"
fi
