#!/usr/bin/env bash
# Narrow frozen weights on the accelerator machine's 16-core Xeon: the step with W stored as f32, bf16, f16, Q8_0
# and Q4_0 (step_driver --base-dtype), interleaved (every dtype once per round, minimum over rounds of
# the per-run medians), at 16 and 1 threads; the n = 1 evaluation forward; and dora_memory's peak
# RSS for each dtype at 11008/4096/64/512. Eigen's headers come from .device-carry/Eigen.
# Writes to ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
flags=(-O3 -march=native -fopenmp -DNDEBUG -std=c++17 -Iinclude -Itests/support -I.device-carry)
g++ "${flags[@]}" bench/step_driver.cpp -o /tmp/step_driver &
g++ "${flags[@]}" bench/memory.cpp -o /tmp/dora_memory &
wait
# Extra arguments go to device_storage.py (e.g. --threads 1 --shapes 11008/4096/64/512 --rounds 3
# --no-memory --dtypes f32 bf16 q4 --tag _rerun; the tag names the output files).
tag=""
for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--tag" ] && { j=$((i + 1)); tag=${!j}; }; done
PYTHONUNBUFFERED=1 python3 bench/device_storage.py "$out" "$@" | tee "$out/storage${tag}.txt"
