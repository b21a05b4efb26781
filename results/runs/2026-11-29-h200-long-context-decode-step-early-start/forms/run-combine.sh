#!/bin/bash
# The combine's loads in one round (combine.cu, the working tree's
# decode_attn.cu) against the built-in kernels of 8930e74's test binary
# (dist/lc2): the kernel tests with combine.cu, then decode_step_timings at
# 4k, 16k and 64k, alternating, two rounds.
set -u
B=$PWD/dist/lc2; D=$PWD/dist/lc3
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
(BENCH_SUITE_DECODE_ATTN_CU=$D/combine.cu timeout 200 $B/workloads-tests --test-threads 1 --nocapture longctx::cuda::tests 2>&1 | grep -E "test |error|result|panicked|rel err|floor") > $OUT/cuda-tests-combine.txt; tail -3 $OUT/cuda-tests-combine.txt
T="$B/workloads-tests --test-threads 1 --nocapture --ignored longctx::cuda::tests::decode_step_timings"
for r in 1 2; do
  echo "== builtin"; LONGCTX_CONTEXTS=${CTX:-4096,16384,65536} timeout 150 $T 2>&1 | grep -E "^dense|^    dense u|^sink|^kv-cl|^block-topk "
  echo "== combine"; BENCH_SUITE_DECODE_ATTN_CU=$D/combine.cu LONGCTX_CONTEXTS=${CTX:-4096,16384,65536} timeout 150 $T 2>&1 | grep -E "^dense|^    dense u|^sink|^kv-cl|^block-topk "
done 2>&1 | tee $OUT/ab-combine.txt
