#!/bin/bash
# Fixed forward schedules beside the autotuned one (r10's candidates), with
# r10's test binary (dist/r10, 6aa2cd8), one H200, one call.
B=$PWD/dist/r10; xz -df $B/workloads-tests.xz; chmod +x $B/workloads-tests; mkdir -p $OUT
BENCH_SUITE_SLA_SWEEP=builtin BENCH_SUITE_SLA_SWEEP_SMALL=auto,g16,g24,g32,g48,g64,c24,c32,c48,c64 \
  timeout 500 $B/workloads-tests --test-threads 1 --nocapture --ignored --exact pointcloud::cuda::tests::sla_forward_sweep > $OUT/sweep-shares.txt 2>&1
