#!/bin/bash
# The early start of long bulk-copy range steps (new.cu, the working tree's
# decode_attn.cu) against the built-in kernels of the test binary (aa41165):
# the kernel tests with new.cu, then decode_step_timings at every context,
# alternating.
set -u
D=$PWD/dist/lc1
[ -f $D/workloads-tests.xz ] && xz -df $D/workloads-tests.xz && chmod +x $D/workloads-tests
mkdir -p $OUT
(BENCH_SUITE_DECODE_ATTN_CU=$D/new.cu timeout 200 $D/workloads-tests --test-threads 1 --nocapture longctx::cuda::tests 2>&1 | grep -E "test |error|result|panicked|rel err|floor" ) | tee $OUT/cuda-tests-new.txt
T="$D/workloads-tests --test-threads 1 --nocapture --ignored longctx::cuda::tests::decode_step_timings"
for r in 1 2; do
  echo "== builtin"; timeout 150 $T 2>&1 | grep -E "^dense|^    dense u|^sink|^kv-cl|^block-topk |copy"
  echo "== new"; BENCH_SUITE_DECODE_ATTN_CU=$D/new.cu timeout 150 $T 2>&1 | grep -E "^dense|^    dense u|^sink|^kv-cl|^block-topk |copy"
done 2>&1 | tee $OUT/ab-new.txt
