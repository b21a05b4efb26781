#!/bin/bash
# After the refactor of sla_bwd_mma's three chunk loops into for_chunks:
# the point-cloud CUDA kernel tests (every kernel against its float64
# reference, the broken kernel) and the backward sweep, on the GPU.
set -u
D=$PWD/dist/kt
[ -x $D/workloads-tests ] || { xz -dc $D/workloads-tests.xz > $D/workloads-tests && chmod +x $D/workloads-tests; }
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest") > $OUT/cuda-tests.txt
(cd $D && timeout 150 ./workloads-tests --test-threads 1 --nocapture --ignored pointcloud::cuda::tests::sla_backward_sweep 2>&1) > $OUT/sweep-backward.txt
cat $OUT/cuda-tests.txt; tail -30 $OUT/sweep-backward.txt
