#!/bin/bash
# sla_bwd_mma with __launch_bounds__(256, 1): the kernel test, the backward
# sweep, and ncu of one 1M-voxel f32 launch (as r9's ncu.sh).
set -u
D=$PWD/dist/lb1
gunzip -f $D/workloads-tests.gz; chmod +x $D/workloads-tests
mkdir -p $OUT
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|TensorCore|Broken") > $OUT/cuda-tests.txt
(cd $D && timeout 150 ./workloads-tests --test-threads 1 --nocapture --ignored pointcloud::cuda::tests::sla_backward_sweep 2>&1) > $OUT/sweep-backward.txt
cat $OUT/cuda-tests.txt; cat $OUT/sweep-backward.txt | grep -E "voxels|result"
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
(cd $D && timeout -s INT 150 $NCU --kernel-name regex:sla_bwd_mma --launch-skip 310 --launch-count 1 \
  --cache-control all --clock-control none --set full --import-source no \
  ./workloads-tests --test-threads 1 --ignored pointcloud::cuda::tests::sla_backward_sweep) > $OUT/ncu-bwd-1m-f32.txt 2>&1
grep -E "  Duration|Local Memory Spilling Requests  |Registers Per Thread|Achieved Occupancy|No Eligible" $OUT/ncu-bwd-1m-f32.txt
