#!/bin/bash
# The forward's block and cluster sums with their loads issued together
# (red.cu, the working tree's kernels.cu) against the built-in source of
# r11's test binary (4607258): kernel tests of red.cu against the float64
# references, then sla_forward_sweep (autotuned) alternating sources.
set -u
B=$PWD/dist/r11; D=$PWD/dist/sla5
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
(cd $B && BENCH_SUITE_SLA_CU=$D/red.cu timeout 100 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|largest") > $OUT/cuda-tests-red.txt
grep -E "result|panicked|error" $OUT/cuda-tests-red.txt | head -3
(BENCH_SUITE_SLA_SWEEP=builtin,$D/red.cu,builtin,$D/red.cu BENCH_SUITE_SLA_SWEEP_SMALL=auto \
  timeout ${LIMIT:-200} $B/workloads-tests --test-threads 1 --nocapture --ignored --exact pointcloud::cuda::tests::sla_forward_sweep 2>&1) > $OUT/sweep.txt
echo "rc $?"
grep -v autotuned $OUT/sweep.txt | grep -E "voxels|panicked|error" | grep -v SlaFfma | sed "s#$D/##; s/([0-9]* voxels)//; s/err [0-9.e-]*//g; s/ None Sla//" | cut -c1-120
