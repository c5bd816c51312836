#!/usr/bin/env bash
# bench/README.md's target ratios, measured with Google Benchmark's random interleaving: repetitions of
# all benchmarks are shuffled together, so a slow minute of a shared machine hits every method alike
# (run-in-order medians on a shared host drifted by up to 35% between benchmarks of identical work).
# Same carry setup as bench/run_device.sh. Writes to ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
g++ -O3 -march=native -fopenmp -DNDEBUG -std=c++17 -Iinclude -Itests/support -I.device-carry -I.device-carry/inc \
  bench/bench_dora.cpp .device-carry/lib/libbenchmark.so.1debian -lpthread -o /tmp/dora_bench
export LD_LIBRARY_PATH=$PWD/.device-carry/lib
filter='Step(Base|Lora|Dora|DoraExact)/4096/4096/16/512|Step(Lora|Dora)/11008/4096/64/512|Forward(Lora|DoraEval)/4096/4096/16/512|RowNorm.*/11008'
for t in 1 16; do
  OMP_NUM_THREADS=$t /tmp/dora_bench --benchmark_filter="$filter" --benchmark_repetitions=7 \
    --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true \
    --benchmark_out="$out/interleaved_${t}thread.json" --benchmark_out_format=json | grep -E "median" \
    > "$out/interleaved_${t}thread.txt"
done
cat "$out"/interleaved_*thread.txt
