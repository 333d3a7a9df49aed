#!/usr/bin/env bash
# Short coverage-guided fuzz runs of every target in relay/fuzz (cargo-fuzz, libFuzzer), each
# for FUZZ_SECONDS (default 15), starting from a copy of the committed seed corpus. The
# toolchain here is stable, so the run uses RUSTC_BOOTSTRAP for cargo-fuzz's flags and no
# sanitizer (`-s none`); out-of-bounds accesses still panic in safe Rust. Findings are kept in
# relay/fuzz/artifacts and fail the run.
set -euo pipefail
cd "$(dirname "$0")/../relay"
secs=${FUZZ_SECONDS:-15}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in stun_decode turn_unauthenticated turn_authenticated signaling_envelope; do
  cp -r "fuzz/corpus/$target" "$work/$target"
  echo "fuzz: $target for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -s none "$work/$target" -- \
    -max_total_time="$secs" -max_len=2048 2>"$work/$target.log" || {
      tail -n 40 "$work/$target.log"; exit 1; }
  grep -E "^Done" "$work/$target.log" || true
done
