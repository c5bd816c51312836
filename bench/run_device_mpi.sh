#!/usr/bin/env bash
# The MPI scaling table (bench/mpi_scaling.cpp): K = 1, 2, 4, 8 ranks x 16 / K threads on the
# device's 16 cores, a stack of 4096-wide DoRA layers (r = 16), a global batch of 512 rows split over
# the ranks. The device has no MPI: .device-carry/mpi.tar.xz holds Debian 12's Open MPI 4.1.4 runtime
# (orterun, its libraries and plugins, mpi.h; made by bench/make_mpi_carry.sh), relocated with
# OPAL_PREFIX; Eigen as for bench/run_device.sh. Writes to ${OUT:-bench-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
mpi=/tmp/dora-mpi
rm -rf "$mpi" && mkdir -p "$mpi"
tar xJf .device-carry/mpi.tar.xz -C "$mpi" --strip-components=1
export OPAL_PREFIX=$mpi PMIX_INSTALL_PREFIX=$mpi
export OMPI_MCA_mca_base_component_path=$mpi/plugins PMIX_MCA_mca_base_component_path=$mpi/pmix
export LD_LIBRARY_PATH=$mpi/libs:${LD_LIBRARY_PATH:-}
export PATH=$mpi/bin:$PATH
export PMIX_MCA_pcompress_base_silence_warning=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_btl_vader_single_copy_mechanism=none
g++ -O3 -march=native -fopenmp -DNDEBUG -std=c++17 -Iinclude -Itests/support -I.device-carry -I"$mpi/include" \
  bench/mpi_scaling.cpp -L"$mpi/libs" -l:libmpi.so.40 -o /tmp/mpi_scaling
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA" > "$out/cpu.txt"
orterun --version | head -1 > "$out/mpi_version.txt"
cores=${CORES:-16}
: > "$out/mpi_scaling.jsonl"
for rep in 1 2 3; do  # three passes, K interleaved, so that every K sees the same slow minutes
  for k in 1 2 4 8; do
    t=$((cores / k))
    orterun -np "$k" --map-by "slot:PE=$t" --bind-to core -x OMP_NUM_THREADS="$t" -x OMP_PROC_BIND=close \
      -x LD_LIBRARY_PATH /tmp/mpi_scaling --width 4096 --layers 4 --rank 16 --batch 512 --steps 10 --warmup 3 \
      2> "$out/stderr_k${k}_rep${rep}.txt" | sed "s/}$/,\"pass\":$rep}/" | tee -a "$out/mpi_scaling.jsonl"
  done
done
