#!/usr/bin/env bash
# The bf16 backend on the device host (torch + peft, no Eigen, no oneDNN): from a checkout whose .device-carry/
# holds Eigen's headers (Eigen/) and Debian 12's oneDNN 2.6 (dnnl.tar.xz, from bench/make_dnnl_carry.sh).
#  1. tests/data/bf16 made by real PEFT (tools/make_bf16_reference.py);
#  2. which kernel oneDNN runs (DNNL_VERBOSE: the ISA of the matmul it picks);
#  3. bench/bf16_compare.py: this project's bf16 step against torch and PEFT bf16, interleaved.
# Writes ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out/bf16"
tar xJf .device-carry/dnnl.tar.xz -C /tmp
export LD_LIBRARY_PATH=/tmp/dnnl/lib
CUDA_VISIBLE_DEVICES="" python3 tools/make_bf16_reference.py --out "$out/bf16" | tee "$out/bf16_reference_log.txt"
g++ -std=c++17 -O3 -march=native -fopenmp -DNDEBUG -DDORA_WITH_DNNL -Iinclude -Itests/support -I.device-carry -I/tmp/dnnl/include \
  bench/bf16_step.cpp /tmp/dnnl/lib/libdnnl.so.2 -o /tmp/bf16_step
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400 > "$out/cpu.txt"
printf 'step\n' | DNNL_VERBOSE=1 OMP_NUM_THREADS=16 /tmp/bf16_step 4096 4096 16 512 | grep -E "exec|units" \
  | sort | uniq -c | head -20 > "$out/bf16_dnnl_verbose.txt" || true
PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="" python3 bench/bf16_compare.py --driver /tmp/bf16_step --threads 1 16 \
  --reps 9 --out "$out" 2>&1 | tee "$out/bf16_compare_log.txt" | tail -8
