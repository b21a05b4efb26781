#!/bin/bash
# The kernel tests with rcpb.cu (the working tree's kernels.cu: block items
# by shuffle, reciprocals in the forwards and the tensor-core backward),
# then sla_backward_sweep alternating the built-in source of 8930e74's
# test binary (dist/lc2) and rcpb.cu, two rounds.
set -u
B=$PWD/dist/lc2; D=$PWD/dist/sla2
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
(cd $B && BENCH_SUITE_SLA_CU=$D/rcpb.cu timeout 250 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest|warning") > $OUT/cuda-tests.txt
tail -4 $OUT/cuda-tests.txt
T="$B/workloads-tests --test-threads 1 --nocapture --ignored --exact pointcloud::cuda::tests::sla_backward_sweep"
for r in 1 2; do
  echo "== builtin"; timeout 200 $T 2>&1 | grep voxels
  echo "== rcpb"; BENCH_SUITE_SLA_CU=$D/rcpb.cu timeout 200 $T 2>&1 | grep voxels
done > $OUT/bwd-sweep.txt
cat $OUT/bwd-sweep.txt | cut -c1-400
