#!/usr/bin/env bash
# The several-adapter benchmarks (bench/bench_multi.cpp): the mixed batch against its parts, and training
# with stacked adapters, with Google Benchmark's random interleaving (every method sees the same
# slow minutes of a shared host), 1 and 16 threads. Same carry setup as bench/run_device.sh.
# Writes to ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
g++ -O3 -march=native -fopenmp -DNDEBUG -std=c++17 -Iinclude -Itests/support -I.device-carry -I.device-carry/inc \
  bench/bench_multi.cpp .device-carry/lib/libbenchmark.so.1debian -lpthread -o /tmp/dora_bench_multi
export LD_LIBRARY_PATH=$PWD/.device-carry/lib
for t in 16 1; do
  OMP_NUM_THREADS=$t /tmp/dora_bench_multi --benchmark_filter='/4096/4096/' --benchmark_repetitions=5 \
    --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true \
    --benchmark_out="$out/multi_${t}thread.json" --benchmark_out_format=json | grep -E "median" \
    > "$out/multi_${t}thread.txt"
done
cat "$out"/multi_*thread.txt
