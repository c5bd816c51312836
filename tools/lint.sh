#!/usr/bin/env bash
# Static checks: clang-format (no diff allowed) and clang-tidy (bugprone, performance; .clang-tidy)
# on the project's own sources. Usage: tools/lint.sh [build-dir-with-compile_commands]
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t sources < <(git ls-files 'include/*.hpp' 'tests/*.cpp' 'tests/*.hpp' 'bench/*.cpp' 'tools/*.cpp' 'examples/*.cpp')
echo "lint: clang-format on ${#sources[@]} files"
clang-format --dry-run --Werror "${sources[@]}"
build=${1:-build-lint}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DDORA_BUILD_BENCH=ON -DDORA_TEST_UNITY=OFF >/dev/null
# One translation unit per area: every library header is included by at least one of these.
units=(examples/quickstart.cpp tools/dora_merge.cpp bench/memory.cpp tests/layers/behaviour.cpp tests/layers/edge_cases.cpp tests/parity/embedding_conv.cpp)
# dora::mpi (where MPI is found): its header through the scaling benchmark.
[ -f "$build/bench/CMakeFiles/dora_mpi_scaling.dir/flags.make" ] && units+=(bench/mpi_scaling.cpp)
# dora::dnnl (where oneDNN is found): its header, and the layers' dispatch to it, through the bf16 driver.
[ -f "$build/bench/CMakeFiles/dora_bf16_step.dir/flags.make" ] && units+=(bench/bf16_step.cpp)
echo "lint: clang-tidy on ${units[*]}"
# One clang-tidy per core; any finding (a non-zero status) fails the whole run.
printf '%s\n' "${units[@]}" | xargs -P "$(nproc)" -I{} clang-tidy -p "$build" --quiet --extra-arg=-std=c++17 {}
echo "lint: clean"
