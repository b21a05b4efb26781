#!/bin/bash
# 2026-11-29 (fifth session) on an H200: run i, the clustered cache by bulk copies. The
# bench-suite binary comes in two parts (dist/lc18p1, dist/lc18p2). Stages: run (the 5-trial run), tests, pf
# (prefetch_chain_sweep), timings (decode_step_timings), launch
# (block_topk_launch_sweep), run (`bench-suite run long-context --variant
# decode-step --device cuda --profile full --trials 5`, continued with --resume),
# dense (the same with --entry dense --trials 3, alone in a fresh process).
set -u
D=$PWD/dist/lc18
mkdir -p $D && cp $PWD/dist/lc18p2/COMMIT $D/ && [ -f $D/bench-suite ] || cat $PWD/dist/lc18p1/part $PWD/dist/lc18p2/part > $D/bench-suite.xz
for b in bench-suite workloads-tests; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } > $OUT/gpu.txt
t() { (cd $D && timeout ${T:-200} ./workloads-tests --test-threads 1 --nocapture "$@" 2>&1); }
for stage in "$@"; do case $stage in
tests) t longctx::cuda::tests | grep -E "test |error|result|panicked|copy|floor|prefetch|ring" > $OUT/cuda-tests.txt; cat $OUT/cuda-tests.txt ;;
pf) t --ignored --exact longctx::cuda::tests::prefetch_chain_sweep | grep -E "sweep|result|panicked" > $OUT/prefetch-sweep.txt; cat $OUT/prefetch-sweep.txt ;;
timings) t --ignored --exact longctx::cuda::tests::decode_step_timings | grep -v "^running\|^$" > $OUT/timings.txt; cat $OUT/timings.txt ;;
ring) T=500 t --ignored --exact longctx::cuda::tests::long_ring_sweep | grep -E "long-ring|result|panicked" > $OUT/long-ring-sweep.txt; cat $OUT/long-ring-sweep.txt ;;
tsplit) t --ignored --exact longctx::cuda::tests::block_topk_split_sweep | grep -E "sweep|result|panicked" > $OUT/topk-split-sweep.txt; cat $OUT/topk-split-sweep.txt ;;
rsplit) t --ignored --exact longctx::cuda::tests::range_split_sweep | grep -E "sweep|result|panicked" > $OUT/range-split-sweep.txt; cat $OUT/range-split-sweep.txt ;;
launch) t --ignored --exact longctx::cuda::tests::block_topk_launch_sweep | grep -v "^running\|^$" > $OUT/launch-sweep.txt; cat $OUT/launch-sweep.txt ;;
run)
  BENCH_SUITE_COMMIT=$(cat $D/COMMIT) timeout -s INT ${LIMIT:-400} $D/bench-suite run long-context --variant decode-step --device cuda --profile full \
    --trials ${TRIALS:-5} --out $D/lc --resume --quiet --no-report 2>&1 | tail -3
  echo "records: $(wc -l < $D/lc/records.jsonl)"
  mkdir -p $OUT/lc && cp -r $D/lc/. $OUT/lc/ ;;
dense)
  BENCH_SUITE_COMMIT=$(cat $D/COMMIT) timeout -s INT ${LIMIT:-400} $D/bench-suite run long-context --variant decode-step --device cuda --profile full \
    --entry dense --trials 3 --out $D/dense --quiet --no-report 2>&1 | tail -3
  mkdir -p $OUT/dense && cp -r $D/dense/. $OUT/dense/ ;;
esac; done
exit 0
