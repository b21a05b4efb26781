#!/bin/bash
# Session 2026-11-29: Quest's page scores in two FMAs per channel; split
# counts of block-topk's attention.
set -u
D=$PWD/dist/qg
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
xz -dc $D/wl.xz > $D/wl.tmp && chmod +x $D/wl.tmp && mv $D/wl.tmp $D/wl
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
t() { timeout ${T:-200} $D/wl --test-threads 1 --nocapture "$@"; }
for stage in "$@"; do case $stage in
tests)
  t longctx::cuda:: > $OUT/cuda-tests.txt 2>&1
  grep -E "^test |result|panicked" $OUT/cuda-tests.txt ;;
ab)
  for r in 1 2; do for k in new old; do
    echo "== round $r: $k" | tee -a $OUT/timings-ab.txt
    if [ $k = old ]; then export BENCH_SUITE_DECODE_ATTN_CU=$D/old.cu; else unset BENCH_SUITE_DECODE_ATTN_CU; fi
    t --ignored --exact longctx::cuda::tests::decode_step_timings 2>&1 | grep -v "^running\|^$" | tee -a $OUT/timings-ab.txt
  done; done; unset BENCH_SUITE_DECODE_ATTN_CU ;;
splits)
  T=400 t --ignored --exact longctx::cuda::tests::block_topk_split_sweep > $OUT/split-sweep.txt 2>&1
  grep -E "sweep|result|panicked" $OUT/split-sweep.txt ;;
esac; done
