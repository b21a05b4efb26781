#!/bin/bash
# ncu over sla's forward kernels (cold caches, boost clocks), run on the GPU machine from the
# repository root with the r7 binary gzipped in dist/r7. As run for the two CSVs of this run:
#   ncu-nuscenes-forward.csv:   COUNT=300 bash ncu.sh   (defaults; that call had only the first
#                               13 metrics and no timeout around the harness)
#   ncu-scaling-10k-forward.csv: VARIANTS=scaling PROFILE=full COUNT=260 APP_S=150 LIMIT=300 bash ncu.sh
set -u
D=$PWD/dist/r7
gunzip -f $D/bench-suite.gz; chmod +x $D/bench-suite
export BENCH_SUITE_ASSETS=$D/assets BENCH_SUITE_COMMIT=0dba49e
M=gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__occupancy_limit_shared_mem,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_active.avg,sm__cycles_elapsed.max,smsp__cycles_active.max,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__inst_executed.sum
timeout -s INT ${LIMIT:-380} /usr/local/cuda/bin/ncu --kernel-name regex:'sla_fwd' --launch-count ${COUNT:-300} \
  --cache-control all --clock-control none --metrics $M --csv --print-units base \
  timeout -s INT ${APP_S:-90} $D/bench-suite run point-cloud-sla --device cuda $(for v in ${VARIANTS:-nuscenes-like}; do echo --variant $v; done) --entry sla \
  --trials 1 --profile ${PROFILE:-quick} --quiet --no-report --out /tmp/prof > $OUT/ncu.csv 2> $OUT/ncu.err
echo "rc $?"; wc -l $OUT/ncu.csv; tail -5 $OUT/ncu.err
