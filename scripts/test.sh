#!/usr/bin/env bash
# The whole test suite, as CI and people run it: formatting, lints with warnings denied, unit
# and integration tests of every crate, end-to-end tests against real third-party clients,
# and a short fuzz-corpus replay.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== dependencies"
scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== actrix-proto: no runtime, HTTP, io_uring, metrics or logging crate in its tree"
forbidden=$(cargo tree -p actrix-proto -e normal --prefix none | awk '{print $1}' |
  grep -xE 'tokio|mio|axum|hyper|io-uring|glommio|prometheus|prometheus-client|tracing|log|socket2' || true)
if [ -n "$forbidden" ]; then
  echo "actrix-proto depends on: $forbidden" >&2
  exit 1
fi

echo "== cargo build (release binary for the end-to-end tests)"
cargo build --release -p actrix -p actrix-bench

echo "== actr-runtime 0.1.7's signaling client (a crate of its own: signaling/compat)"
cargo fmt --manifest-path signaling/compat/Cargo.toml -- --check
cargo build --manifest-path signaling/compat/Cargo.toml

echo "== actr 0.4.21's client stack (a crate of its own: signaling/compat04)"
cargo fmt --manifest-path signaling/compat04/Cargo.toml -- --check
cargo build --manifest-path signaling/compat04/Cargo.toml

echo "== install scripts (temporary DESTDIR)"
scripts/test-install.sh "$PWD/target/release/actrix"

echo "== cargo test"
cargo test --workspace

echo "== end-to-end tests (coturn clients, aioice)"
ACTRIX_BIN="$PWD/target/release/actrix" ACTRIX_BENCH="$PWD/target/release/actrix-bench" \
  ACTR_RUNTIME_CLIENT="$PWD/signaling/compat/target/debug/actr-runtime-client" \
  ACTR04_CLIENT="$PWD/signaling/compat04/target/debug/actr04-client" \
  python3 -m pytest -q relay/tests/e2e

echo "== bench smoke run against the appliance"
scripts/bench-smoke.sh

echo "== short fuzz runs"
scripts/fuzz.sh
