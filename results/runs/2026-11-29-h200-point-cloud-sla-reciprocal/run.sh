#!/bin/bash
# A/B of the forward's block-item shuffle in sum_shared_states (shfl.cu, the
# working tree's kernels.cu) against the built-in source of 8930e74's test
# binary (dist/lc2): sla_forward_sweep with the autotuned schedule and with
# fixed schedules, sources alternating builtin, shfl, builtin, shfl.
set -u
B=$PWD/dist/lc2; D=$PWD/dist/sla2
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
(BENCH_SUITE_SLA_SWEEP=${SOURCES:-builtin,$D/shfl.cu,builtin,$D/shfl.cu} BENCH_SUITE_SLA_SWEEP_SMALL=${SMALL:-auto,g16,c32} \
  timeout ${LIMIT:-500} $B/workloads-tests --test-threads 1 --nocapture --ignored pointcloud::cuda::tests::sla_forward_sweep 2>&1) > $OUT/sweep.txt
echo "rc $?"
grep -v autotuned $OUT/sweep.txt | grep -E "voxels|panicked|error" | grep -v SlaFfma | sed "s#$D/##" | cut -c1-230
