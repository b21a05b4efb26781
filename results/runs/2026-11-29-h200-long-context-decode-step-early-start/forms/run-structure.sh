#!/bin/bash
# Where dense's time goes at 4k and 16k: the built-in kernels (8930e74's
# test binary, dist/lc2) against forms of decode_attn.cu given through
# BENCH_SUITE_DECODE_ATTN_CU: readonly (the bulk-copy kernel without its
# arithmetic), nocombine (no ticket, no combine: each block writes its
# partial and exits), readonly-nocombine (both). The forms' outputs are
# wrong, so decode_step_timings stops after their dense lines. Two rounds.
set -u
B=$PWD/dist/lc2; D=$PWD/dist/lc3
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
T="$B/workloads-tests --test-threads 1 --nocapture --ignored longctx::cuda::tests::decode_step_timings"
for r in 1 2; do for c in 4096 16384; do
  echo "== builtin $c"; LONGCTX_CONTEXTS=$c timeout 120 $T 2>&1 | grep -E "^dense|^    dense u"
  for f in readonly nocombine readonly-nocombine; do
    echo "== $f $c"; BENCH_SUITE_DECODE_ATTN_CU=$D/$f.cu LONGCTX_CONTEXTS=$c timeout 120 $T 2>&1 | grep -E "^dense"
  done
done; done 2>&1 | tee $OUT/structure.txt
