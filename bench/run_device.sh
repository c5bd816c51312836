#!/usr/bin/env bash
# How bench/README.md's device tables were made: on a machine with torch + peft but no Eigen or
# Google Benchmark, from a checkout whose .device-carry/ holds Eigen's headers (Eigen/), Google
# Benchmark's headers (inc/benchmark/) and its shared library (lib/libbenchmark.so.1debian), all
# copied from Debian 12's packages. Writes to ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
flags=(-O3 -march=native -fopenmp -DNDEBUG -std=c++17 -Iinclude -Itests/support -I.device-carry -I.device-carry/inc)
g++ "${flags[@]}" bench/step_driver.cpp -o /tmp/step_driver
g++ "${flags[@]}" bench/bench_dora.cpp .device-carry/lib/libbenchmark.so.1debian -lpthread -o /tmp/dora_bench
export LD_LIBRARY_PATH=$PWD/.device-carry/lib
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200 > "$out/cpu.txt"
big='(Step|Forward)[A-Za-z]*/(4096/4096/16/512|11008/4096/64/512)|RowNorm.*/11008'
OMP_NUM_THREADS=1 /tmp/dora_bench --benchmark_filter="$big" --benchmark_repetitions=3 \
  --benchmark_report_aggregates_only=true --benchmark_out="$out/bench_1thread.json" --benchmark_out_format=json \
  | grep -E "median|Run on" > "$out/bench_1thread.txt"
OMP_NUM_THREADS=16 /tmp/dora_bench --benchmark_filter="$big" --benchmark_repetitions=3 \
  --benchmark_report_aggregates_only=true --benchmark_out="$out/bench_16threads.json" --benchmark_out_format=json \
  | grep -E "median|Run on" > "$out/bench_16threads.txt"
PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="" python3 bench/peft_compare.py --driver /tmp/step_driver --threads 1 16 \
  --reps 5 --out "$out" > "$out/peft_compare_log.txt" 2>&1
cat "$out"/bench_1thread.txt "$out"/bench_16threads.txt "$out/peft_compare.md"
