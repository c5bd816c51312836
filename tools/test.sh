#!/usr/bin/env bash
# The README's test command: install what is missing, build the tests, examples and tools with
# warnings as errors, run every test. The benchmarks are not built here (they test nothing; CI
# compiles them in its lint step). Usage: tools/test.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
tools/install-deps.sh
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DDORA_WERROR=ON -DDORA_BUILD_BENCH=OFF
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)"
