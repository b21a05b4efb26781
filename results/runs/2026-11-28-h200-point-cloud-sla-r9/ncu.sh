#!/bin/bash
# Nsight Compute over the tensor-core backward (sla_bwd_mma), one launch
# each of: Waymo-like frame f32, bf16; 1M voxels f32, bf16. The launches
# come from the ignored test sla_backward_sweep (35 calls per scene and
# precision, f32 then bf16; scenes waymo, nuscenes, 10k, 100k, 1M), so
# skipping 30, 65, 310 and 345 matching launches lands on warm-up-free
# calls of each. Cold caches (--cache-control all), boost clocks.
set -u
D=$PWD/dist/r9
[ -f $D/workloads-tests.gz ] && gunzip -f $D/workloads-tests.gz && chmod +x $D/workloads-tests
mkdir -p $OUT
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
$NCU --version | tail -1
for spec in waymo-f32:30 waymo-bf16:65 1m-f32:310 1m-bf16:345; do
  name=${spec%%:*}; skip=${spec##*:}
  (cd $D && timeout -s INT 150 $NCU --kernel-name regex:sla_bwd_mma --launch-skip $skip --launch-count 1 \
    --cache-control all --clock-control none --set full --import-source no \
    ./workloads-tests --test-threads 1 --ignored pointcloud::cuda::tests::sla_backward_sweep) > $OUT/ncu-bwd-$name.txt 2>&1
  echo "$name rc $? $(grep -c 'sla_bwd_mma' $OUT/ncu-bwd-$name.txt)"
done
