#!/bin/bash
# Source-level (SASS) profiles of the SLA forward on an H200: the
# nuScenes-like frame (cluster schedule, 32 voxels a warp) and 10k voxels
# (grouped, 16 a warp), f32, through sla_forward_sweep of the test binary
# in dist/lc2 (commit 8930e74). Launches 101-102 and 161-162 of the
# filtered kernel are the nuScenes-like and 10k scenes' timed launches.
set -u
B=$PWD/dist/lc2
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
NCU=$(ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1); [ -z "$NCU" ] && NCU=$(which ncu)
echo "ncu: $NCU"; $NCU --version | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
T="$B/workloads-tests --test-threads 1 --nocapture --ignored --exact pointcloud::cuda::tests::sla_forward_sweep"
prof() { # name sched kernel skip
  BENCH_SUITE_SLA_SWEEP_SMALL=$2 timeout 300 $NCU --kernel-name regex:$3 --launch-skip $4 --launch-count 2 --kill yes \
    --set full --import-source no --cache-control all --clock-control none -o $OUT/$1 -f $T > $OUT/$1.log 2>&1
  echo "$1 rc $?"; tail -3 $OUT/$1.log
  $NCU -i $OUT/$1.ncu-rep --page details > $OUT/$1-details.txt 2>&1
  $NCU -i $OUT/$1.ncu-rep --page source --csv --print-source sass > $OUT/$1-sass.csv 2>&1
  wc -l $OUT/$1-details.txt $OUT/$1-sass.csv
}
prof nusc c32 sla_fwd_cluster_f32 100
prof s10k g16 sla_fwd_grouped_f32 160
