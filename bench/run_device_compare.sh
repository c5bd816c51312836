#!/usr/bin/env bash
# Before/after on the accelerator machine's CPU: step_driver of this tree against step_driver of an
# older tree (OLD_TREE: a `git archive` of include/, bench/ and tests/ at the old commit), the same
# shapes interleaved in ROUNDS rounds (min of the per-round medians), at 16 and 1 threads: the DoRA
# and LoRA training steps and the evaluation forward. .device-carry/Eigen holds Debian's Eigen
# headers (the device has none). Usage, from the repository root:
#   git archive --format=tar.gz -o .device-carry/old_tree.tar.gz <old-commit> include bench tests
#   bash bench/run_device_compare.sh > compare.md
set -euo pipefail
cd "$(dirname "$0")/.."
flags="-O3 -march=native -fopenmp -DNDEBUG -std=c++17 -I.device-carry"
mkdir -p /tmp/old && tar xzf "${OLD_TREE:-.device-carry/old_tree.tar.gz}" -C /tmp/old
g++ $flags -Iinclude -Itests/support bench/step_driver.cpp -o /tmp/sd_new &
g++ $flags -I/tmp/old/include -I/tmp/old/tests -I/tmp/old/tests/support /tmp/old/bench/step_driver.cpp -o /tmp/sd_old &
wait
rounds=${ROUNDS:-3}
run() {  # binary threads shape... methods...
  local bin=$1 t=$2; shift 2
  OMP_NUM_THREADS=$t OMP_PROC_BIND=close OMP_PLACES=cores "$bin" "$@" | grep '^{'
}
echo "| threads | shape (d_out/d_in/r/n) | method | before (ms) | after (ms) | after / before |"
echo "|---|---|---|---|---|---|"
for t in 16 1; do
  for shape in "4096 4096 16 512" "4096 4096 16 32" "4096 4096 16 1"; do
    n=${shape##* }
    if [ "$n" = 1 ]; then methods="basefwd lorainfer dorainfer"; reps=50; else methods="lora dora doraexact"; reps=7; fi
    declare -A before=() after=()
    for ((r = 0; r < rounds; ++r)); do
      while read -r line; do
        m=$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["method"], j["median_ms"])' "$line")
        k=${m%% *}; v=${m##* }
        [ -z "${before[$k]:-}" ] || v=$(python3 -c "print(min($v, ${before[$k]}))"); before[$k]=$v
      done < <(run /tmp/sd_old "$t" $shape $reps $methods)
      while read -r line; do
        m=$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["method"], j["median_ms"])' "$line")
        k=${m%% *}; v=${m##* }
        [ -z "${after[$k]:-}" ] || v=$(python3 -c "print(min($v, ${after[$k]}))"); after[$k]=$v
      done < <(run /tmp/sd_new "$t" $shape $reps $methods)
    done
    for k in $methods; do
      python3 -c "b=${before[$k]}; a=${after[$k]}; print(f'| $t | ${shape// //} | $k | {b:.3f} | {a:.3f} | {a/b:.3f} |')"
    done
    unset before after
  done
done
echo
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); $(nproc) threads available"
