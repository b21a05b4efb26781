#!/bin/bash
# A/B of the forward's L2 prefetches (FWD_L2_AHEAD in kernels.cu): the
# ignored sla_forward_sweep over the built-in source (FWD_L2_AHEAD = 0) and
# variants that prepend a #define, alternating. STAGE=tests runs the CUDA
# kernel tests of the built-in source first.
set -u
D=$PWD/dist/sla1
[ -f $D/workloads-tests.xz ] && xz -df $D/workloads-tests.xz && chmod +x $D/workloads-tests
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
if [ "${STAGE:-}" = tests ]; then
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest") | tee $OUT/cuda-tests.txt
fi
(BENCH_SUITE_SLA_SWEEP=${SOURCES:-builtin,$D/ahead4.cu,builtin,$D/ahead4.cu} BENCH_SUITE_SLA_SWEEP_SMALL=auto \
  timeout ${LIMIT:-400} $D/workloads-tests --test-threads 1 --nocapture --ignored pointcloud::cuda::tests::sla_forward_sweep 2>&1) > $OUT/sweep.txt
grep -v autotuned $OUT/sweep.txt | grep -E "voxels|panicked|error" | sed "s#$D/##" 
