#!/usr/bin/env bash
# ctest's example_data_parallel: the acceptance test of data-parallel training over MPI.
#  1. 2 ranks reproduce 1 rank (the same global batch of 64, 100 steps) to <= 1e-5 relative, in both
#     the final loss and the sum of every trainable parameter;
#  2. 2 ranks resumed from the checkpoint that 1 rank wrote at step 50 finish like the uninterrupted run.
# Usage: data_parallel_test.sh <data_parallel> <scratch dir> <launcher and flags, ending with the
#        rank-count flag (mpiexec ... -n)>
set -euo pipefail
program=$1 work=$2
shift 2
launcher=("$@")
rm -rf "$work" && mkdir -p "$work"

# run RANKS ARGS...: prints the final line's two numbers
run() {
  local ranks=$1
  shift
  local out
  if ! out=$("${launcher[@]}" "$ranks" "$program" "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "data_parallel on $ranks rank(s) ($*) failed" >&2
    exit 1
  fi
  printf -- '--- %s rank(s), %s:\n%s\n' "$ranks" "$*" "$out" >&2
  printf '%s\n' "$out" | sed -n 's/^final_loss=\([^ ]*\) params_checksum=\([^ ]*\)$/\1 \2/p' | tail -1
}

# close WHAT "a1 a2" "b1 b2": |a - b| <= 1e-5 |b| for both numbers
close() {
  awk -v what="$1" -v a="$2" -v b="$3" 'BEGIN {
    split(a, x, " "); split(b, y, " ");
    if (x[1] == "" || y[1] == "") { print what ": no final_loss line"; exit 1 }
    bad = 0;
    for (i = 1; i <= 2; ++i) {
      d = x[i] - y[i]; if (d < 0) d = -d; s = y[i]; if (s < 0) s = -s;
      printf "%s: %s vs %s: relative difference %.3g\n", what, x[i], y[i], (s > 0 ? d / s : d);
      if (d > 1e-5 * s) bad = 1;
    }
    exit bad }'
}

one=$(run 1 --steps 100)
two=$(run 2 --steps 100)
close "2 ranks vs 1 rank, 100 steps" "$two" "$one"
run 1 --steps 100 --stop 50 --save "$work/step-50" > /dev/null
resumed=$(run 2 --steps 100 --resume "$work/step-50")
close "2 ranks resumed at step 50 vs 1 rank uninterrupted" "$resumed" "$one"
rm -rf "$work"
