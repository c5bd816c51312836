#!/usr/bin/env bash
# Issue 15 (WIP): bench/dnnl_step.cpp on the device (Eigen and oneDNN carried: .device-carry/Eigen,
# .device-carry/dnnl.tar.xz from bench/make_dnnl_carry.sh), next to torch's bf16 frozen nn.Linear
# step (forward + backward to x) at the same shapes and threads. Writes ${OUT:-bench-out}/dnnl_step.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
tar xJf .device-carry/dnnl.tar.xz -C /tmp
g++ -std=c++17 -O3 -march=native -fopenmp -DNDEBUG -DDORA_WITH_DNNL -Iinclude -I.device-carry -I/tmp/dnnl/include \
  bench/dnnl_step.cpp /tmp/dnnl/lib/libdnnl.so.2 -o /tmp/dnnl_step
export LD_LIBRARY_PATH=/tmp/dnnl/lib
for t in 1 16; do
  for shape in "4096 4096 16 512" "11008 4096 64 512"; do
    set -- $shape
    OMP_NUM_THREADS=$t /tmp/dnnl_step "$1" "$2" "$3" "$4" 5 | sed "s/^/threads $t: /" | tee -a "$out/dnnl_step.txt"
    CUDA_VISIBLE_DEVICES="" python3 - "$t" "$1" "$2" "$4" <<'PY' | tee -a "$out/dnnl_step.txt"
import sys, time, torch
t, d_out, d_in, n = map(int, sys.argv[1:])
torch.set_num_threads(t)
lin = torch.nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16).requires_grad_(False)
x = torch.randn(n, d_in, dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(n, d_out, dtype=torch.bfloat16)
ts = []
for i in range(6):
    a = time.perf_counter(); y = lin(x); y.backward(dy); x.grad = None; ts.append(time.perf_counter() - a)
ts = sorted(ts[1:])
print(f"threads {t}: torch bf16 frozen Linear {d_out}/{d_in}/n{n}: {1e3*ts[len(ts)//2]:.1f} ms")
PY
  done
done
