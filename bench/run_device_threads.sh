#!/usr/bin/env bash
# How bench/README.md's "Threads" tables were made, on the accelerator machine (torch +
# peft, no Eigen: .device-carry/Eigen holds Debian's headers, as for run_device.sh):
#   1. split_products: Eigen's threaded GEMM against the layer's own split of W (1 and 16 threads);
#   2. device_threads.py: step_driver of this tree against the tree before the split (OLD_TREE, a
#      `git archive` of include/ and bench/ at 9c78647), interleaved in 2 rounds, with torch's frozen
#      nn.Linear and PEFT's DoRA in the same run; then the evaluation forwards at n = 1 and 32.
# Writes to ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
flags="-O3 -march=native -fopenmp -DNDEBUG -std=c++17 -I.device-carry -Itests/support"
g++ $flags bench/split_products.cpp -o /tmp/split_products
for t in 16 1; do OMP_NUM_THREADS=$t OMP_PROC_BIND=close OMP_PLACES=cores /tmp/split_products; done \
  | tee "$out/split_products.txt"
g++ $flags -Iinclude -Itests/support bench/step_driver.cpp -o /tmp/sd_new
mkdir -p /tmp/old && tar xzf "${OLD_TREE:-.device-carry/old_tree.tar.gz}" -C /tmp/old
g++ $flags -I/tmp/old/include /tmp/old/bench/step_driver.cpp -o /tmp/sd_old
CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1 python3 bench/device_threads.py | tee "$out/threads.txt"
