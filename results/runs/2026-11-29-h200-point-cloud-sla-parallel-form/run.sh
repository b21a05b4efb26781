#!/bin/bash
# Parallel form for small solo windows (quad16.cu / quad32.cu: the working
# tree's kernels.cu with QUAD_MAX 16 / 32) against the built-in source of
# the r10 test binary (6aa2cd8): kernel tests of each against the float64
# references, then sla_forward_sweep (autotuned) alternating sources.
set -u
B=$PWD/dist/r10; D=$PWD/dist/sla4
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
for s in ${TESTS:-quad16 quad32}; do
  (cd $B && BENCH_SUITE_SLA_CU=$D/$s.cu timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|largest") > $OUT/cuda-tests-$s.txt
  echo "== $s"; grep -E "result|panicked|error" $OUT/cuda-tests-$s.txt | head
done
(BENCH_SUITE_SLA_SWEEP=${SOURCES:-builtin,$D/quad16.cu,$D/quad32.cu,builtin,$D/quad16.cu,$D/quad32.cu} BENCH_SUITE_SLA_SWEEP_SMALL=${SMALL:-auto} \
  timeout ${LIMIT:-400} $B/workloads-tests --test-threads 1 --nocapture --ignored --exact pointcloud::cuda::tests::sla_forward_sweep 2>&1) > $OUT/sweep.txt
echo "rc $?"
grep -v autotuned $OUT/sweep.txt | grep -E "voxels|panicked|error" | grep -v SlaFfma | sed "s#$D/##" | cut -c1-200
