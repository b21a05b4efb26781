#!/bin/bash
# ncu over sla's forward kernels on small scenes (quick profile), cold caches, boost clocks.
set -u
D=$PWD/dist/r7
gunzip -f $D/bench-suite.gz; chmod +x $D/bench-suite
export BENCH_SUITE_ASSETS=$D/assets BENCH_SUITE_COMMIT=0dba49e
M=gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__occupancy_limit_shared_mem,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_active.avg,sm__cycles_elapsed.max,smsp__cycles_active.max
timeout -s INT ${LIMIT:-380} /usr/local/cuda/bin/ncu --kernel-name regex:'sla_fwd' --launch-count ${COUNT:-300} \
  --cache-control all --clock-control none --metrics $M --csv --print-units base \
  $D/bench-suite run point-cloud-sla --device cuda --variant nuscenes-like --variant scaling --entry sla \
  --trials 1 --profile quick --quiet --no-report --out /tmp/prof > $OUT/ncu.csv 2> $OUT/ncu.err
echo "rc $?"; wc -l $OUT/ncu.csv; tail -5 $OUT/ncu.err
