#!/usr/bin/env bash
# The test suite on another machine, built with -march=native (DORA_NATIVE): how the AVX-512 check
# after the first landing was run on the accelerator machine's Xeon (g++ 13), which has CMake and a
# compiler but not Eigen, Catch2 or nlohmann-json. Their headers and CMake package files are carried from
# Debian 12's packages in .device-carry/prefix/usr (include/{eigen3,catch2,nlohmann}, lib/libCatch2WithMain.a,
# lib/cmake/Catch2, share/cmake/nlohmann_json, share/eigen3/cmake). Writes ${OUT:-test-out}/tests.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-test-out}
mkdir -p "$out"
{
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "AVX-512: $(grep -o -m1 'avx512f' /proc/cpuinfo | head -1 || true)"
  g++ --version | head -1
  cmake -S . -B /tmp/build-device -DCMAKE_BUILD_TYPE=Release -DDORA_WERROR=ON -DDORA_NATIVE=ON \
    -DDORA_BUILD_BENCH=OFF -DDORA_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$PWD/.device-carry/prefix/usr" >/dev/null
  cmake --build /tmp/build-device -j"$(nproc)" > /tmp/device-build.log 2>&1 || { tail -40 /tmp/device-build.log; exit 1; }
  grep -E "warning:|error:" /tmp/device-build.log || echo "build: no warnings"
  ctest --test-dir /tmp/build-device -j"$(nproc)" 2>&1 | tail -15
} 2>&1 | tee "$out/tests.txt"
