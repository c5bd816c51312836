#!/usr/bin/env bash
# Which backend wins where: the same step_driver built three ways, on the accelerator
# machine's 16-core Xeon, with torch's frozen nn.Linear in the same run:
#   eigen     the default build: Eigen's kernels, the layer's own split of W over OpenMP threads;
#   openblas  -DEIGEN_USE_BLAS against Debian 12's OpenBLAS 0.3.21 (OpenMP build), which threads
#             itself (the layer then does not split); run with its own CPU detection and again with
#             OPENBLAS_CORETYPE=SkylakeX;
#   blis      -DEIGEN_USE_BLAS against Debian 12's BLIS 0.9 (OpenMP build).
# The .so files travel in .device-carry/blas.tar.xz (copied from Debian's libopenblas0-openmp and
# libblis4-openmp, with libgfortran5 and libquadmath0); Eigen's headers in .device-carry/Eigen.
# Writes to ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out" /tmp/blas
tar xJf .device-carry/blas.tar.xz -C /tmp/blas
flags=(-O3 -march=native -fopenmp -DNDEBUG -std=c++17 -Iinclude -Itests/support -I.device-carry)
g++ "${flags[@]}" bench/step_driver.cpp -o /tmp/sd_eigen &
g++ "${flags[@]}" -DEIGEN_USE_BLAS bench/step_driver.cpp /tmp/blas/libopenblas.so.0 -o /tmp/sd_openblas &
g++ "${flags[@]}" -DEIGEN_USE_BLAS bench/step_driver.cpp /tmp/blas/libblis.so.4 -o /tmp/sd_blis &
wait
export LD_LIBRARY_PATH=/tmp/blas
(OPENBLAS_VERBOSE=2 OMP_NUM_THREADS=1 /tmp/sd_openblas 256 256 8 64 1 base 2>&1 | grep -i core || true
 OPENBLAS_CORETYPE=SkylakeX OPENBLAS_VERBOSE=2 OMP_NUM_THREADS=1 /tmp/sd_openblas 256 256 8 64 1 base 2>&1 | grep -i core || true
 BLIS_ARCH_DEBUG=1 OMP_NUM_THREADS=1 /tmp/sd_blis 256 256 8 64 1 base 2>&1 | grep -i config || true) \
  | tee "$out/blas_detect.txt"
CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1 python3 bench/device_blas.py "$out" | tee "$out/blas.txt"
