#!/bin/bash
# Per-slot spans for the grouped/cluster forward: the kernel tests with the
# new build (dist/sla3), then sla_forward_sweep (autotuned) alternating the
# r10 build (dist/r10, 6aa2cd8) and the new one, two rounds.
set -u
O=$PWD/dist/r10; N=$PWD/dist/sla3
for d in $O $N; do [ -f $d/workloads-tests.xz ] && xz -df $d/workloads-tests.xz && chmod +x $d/workloads-tests; done
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
(cd $N && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest") > $OUT/cuda-tests.txt
grep -E "result|Broken|panicked" $OUT/cuda-tests.txt
for r in 1 2; do for b in $O $N; do
  echo "== $(basename $b)"; BENCH_SUITE_SLA_SWEEP_SMALL=${SMALL:-auto} timeout 200 $b/workloads-tests --test-threads 1 --nocapture --ignored --exact pointcloud::cuda::tests::sla_forward_sweep 2>&1 | grep -v autotuned | grep -E "voxels|panicked" | grep -v SlaFfma
done; done > $OUT/sweep.txt
sed 's/(\([0-9]*\) voxels)//; s/builtin None //' $OUT/sweep.txt | cut -c1-150
