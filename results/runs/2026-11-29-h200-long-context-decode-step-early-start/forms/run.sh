#!/bin/bash
# Dense at 4k/16k: the built-in kernels, then the bulk-copy kernel with its
# arithmetic removed (readonly.cu: each warp still reads its rows from
# shared memory), via BENCH_SUITE_DECODE_ATTN_CU. The variant's output is
# wrong, so decode_step_timings stops after the dense lines.
set -u
D=$PWD/dist/lc1
[ -f $D/workloads-tests.xz ] && xz -df $D/workloads-tests.xz && chmod +x $D/workloads-tests
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
T="$D/workloads-tests --test-threads 1 --nocapture --ignored longctx::cuda::tests::decode_step_timings"
for r in 1 2; do
for c in 4096 16384; do
  echo "== builtin $c"; LONGCTX_CONTEXTS=$c timeout 120 $T 2>&1 | grep -E "copy|^dense|^    dense"
  echo "== readonly $c"; BENCH_SUITE_DECODE_ATTN_CU=$D/readonly.cu LONGCTX_CONTEXTS=$c timeout 120 $T 2>&1 | grep -E "copy|^dense|^    dense|panicked"
done
done 2>&1 | tee $OUT/ab.txt
