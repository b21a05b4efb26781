#!/bin/bash
# A/B: bulk-copy range steps issuing their first tiles before the
# programmatic-dependent-launch wait (early.cu) against the built-in
# kernels; decode_step_timings at 4k, 16k and 64k, alternating.
set -u
D=$PWD/dist/lc1
[ -f $D/workloads-tests.xz ] && xz -df $D/workloads-tests.xz && chmod +x $D/workloads-tests
mkdir -p $OUT
T="$D/workloads-tests --test-threads 1 --nocapture --ignored longctx::cuda::tests::decode_step_timings"
for r in 1 2; do
  echo "== builtin"; LONGCTX_CONTEXTS=${CTX:-4096,16384,65536} timeout 150 $T 2>&1 | grep -vE "^test |^running|^$"
  echo "== early"; BENCH_SUITE_DECODE_ATTN_CU=$D/early.cu LONGCTX_CONTEXTS=${CTX:-4096,16384,65536} timeout 150 $T 2>&1 | grep -vE "^test |^running|^$|warning: kernels"
done 2>&1 | tee $OUT/ab-early.txt
