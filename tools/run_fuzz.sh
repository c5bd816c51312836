#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors parser (tests/fuzz/fuzz_safetensors.cpp) with
# clang++-14 under AddressSanitizer + UndefinedBehaviorSanitizer and runs it for a bounded time on
# a scratch copy of tests/fuzz/corpus (the committed corpus is never modified).
#
#   tools/run_fuzz.sh [SECONDS]        default 60
# Env: CXX (default clang++-14), EIGEN_INCLUDE (default /usr/include/eigen3), FUZZ_WORKDIR (default
# a fresh temporary directory, removed at exit unless a crash was found).
# Exit status: 0 when the run ends without a finding, non-zero on a finding (crash, sanitizer
# report, leak, timeout of one input) or a build failure. Crash inputs are left in the work dir,
# whose path is printed.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: $0 [SECONDS]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cxx="${CXX:-clang++-14}"
eigen="${EIGEN_INCLUDE:-/usr/include/eigen3}"
work="${FUZZ_WORKDIR:-$(mktemp -d /tmp/dora_fuzz.XXXXXX)}"
mkdir -p "$work/corpus" "$work/artifacts"
cp "$root"/tests/fuzz/corpus/* "$work/corpus/"

found=1
cleanup() { if [ "$found" -eq 0 ] && [ -z "${FUZZ_WORKDIR:-}" ]; then rm -rf "$work"; fi; }
trap cleanup EXIT

echo "building fuzz_safetensors with $cxx (ASan + UBSan + libFuzzer) in $work"
"$cxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I "$root/include" -I "$eigen" "$root/tests/fuzz/fuzz_safetensors.cpp" -o "$work/fuzz_safetensors"

echo "fuzzing for ${seconds}s"
set +e
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  "$work/fuzz_safetensors" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" "$work/corpus" 2>&1 | tail -n 40
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ] || [ -n "$(ls -A "$work/artifacts")" ]; then
  echo "fuzz_safetensors: FINDING (exit $status); inputs in $work/artifacts" >&2
  exit 1
fi
found=0
echo "fuzz_safetensors: no findings in ${seconds}s"
