#!/usr/bin/env bash
# Coverage-guided fuzz runs of the targets in relay/fuzz (cargo-fuzz, libFuzzer), each for a
# given time, starting from a copy of the committed seed corpus (which the normal tests
# replay: relay/proto/tests and signaling's tests read relay/fuzz/corpus).
#
#   scripts/fuzz.sh                       # the test command's short runs: 15 s each, no sanitizer
#   scripts/fuzz.sh --asan --seconds 3600 --report fuzz-report.txt   # the long runs
#
# Options:
#   --seconds N   time per target (default: $FUZZ_SECONDS or 15)
#   --asan        build with AddressSanitizer (-s address): out-of-bounds reads and writes,
#                 use-after-free and leaks in unsafe code and C dependencies are reported,
#                 not only what safe Rust's bounds checks catch. The toolchain is stable, so
#                 RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags (as it does without ASan).
#   --merge       afterwards, merge the inputs that add coverage into the committed corpus
#                 (libFuzzer -merge=1): the regression corpus grows with what was found
#   --report FILE append one line per target: target, sanitizer, seconds, executions,
#                 corpus files and bytes before and after, result
#   TARGET...     only these targets (default: all)
#
# Findings (crashes, leaks, timeouts) are kept in relay/fuzz/artifacts and fail the run.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/../relay"

secs=${FUZZ_SECONDS:-15}
sanitizer=none
merge=0
report=""
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) secs=$2; shift 2 ;;
    --asan) sanitizer=address; shift ;;
    --merge) merge=1; shift ;;
    --report) report=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$self"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(stun_decode turn_unauthenticated turn_authenticated signaling_envelope)
case "$report" in ""|/*) ;; *) report="$OLDPWD/$report" ;; esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# files and bytes of a corpus directory
corpus_size() { find "$1" -type f | wc -l | tr -d ' '; du -sb "$1" | cut -f1; }

# Build first, so that each target's seconds in the report are its run alone.
RUSTC_BOOTSTRAP=1 cargo fuzz build -s "$sanitizer"

status=0
for target in "${targets[@]}"; do
  [ -d "fuzz/corpus/$target" ] || { echo "fuzz.sh: no target $target" >&2; exit 2; }
  cp -r "fuzz/corpus/$target" "$work/$target"
  read -r -d '' files0 bytes0 < <(corpus_size "$work/$target"; printf '\0') || true
  echo "fuzz: $target for ${secs}s (sanitizer: $sanitizer)"
  result=ok
  t0=$(date +%s)
  # ASan's leak checker needs ptrace-like access some containers forbid; keep it on and let
  # a refusal show in the log.
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -s "$sanitizer" "$work/$target" -- \
    -max_total_time="$secs" -max_len=2048 -timeout=10 -print_final_stats=1 \
    2>"$work/$target.log"; then
    result=FAILED
    status=1
    tail -n 60 "$work/$target.log"
  fi
  took=$(( $(date +%s) - t0 ))
  runs=$(grep -Eo '^Done [0-9]+ runs' "$work/$target.log" | grep -Eo '[0-9]+' || true)
  [ -n "$runs" ] || runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$work/$target.log" | grep -Eo '[0-9]+$' || echo "?")
  read -r -d '' files1 bytes1 < <(corpus_size "$work/$target"; printf '\0') || true
  line="$target sanitizer=$sanitizer seconds=$took executions=$runs corpus_files=$files0->$files1 corpus_bytes=$bytes0->$bytes1 result=$result"
  echo "fuzz: $line"
  [ -z "$report" ] || echo "$(date -u +%FT%TZ) $line" >> "$report"
  if [ "$merge" = 1 ] && [ "$result" = ok ]; then
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -s "$sanitizer" "fuzz/corpus/$target" "$work/$target" -- \
      -merge=1 -max_len=2048 2>"$work/$target.merge.log" || { tail -n 20 "$work/$target.merge.log"; status=1; }
    echo "fuzz: merged into fuzz/corpus/$target: $(find "fuzz/corpus/$target" -type f | wc -l) files"
  fi
done
exit $status
