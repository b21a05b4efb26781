#!/bin/bash
# 2026-11-29 (third session) on an H200: lc8 plus streaming loads of the Quest metadata. Stages
# (arguments): tests (the long-context CUDA tests), sweep (range_split_sweep),
# timings (decode_step_timings), run (`bench-suite run long-context
# --variant decode-step --device cuda --profile full --trials 5` at the
# commit in COMMIT, continued with --resume).
set -u
D=$PWD/dist/lc9
COMMIT=$(cat $D/COMMIT)
for b in bench-suite workloads-tests; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } > $OUT/gpu.txt
t() { (cd $D && timeout ${T:-200} ./workloads-tests --test-threads 1 --nocapture "$@" 2>&1); }
for stage in "$@"; do case $stage in
tests) t longctx::cuda::tests | grep -E "test |error|result|panicked|copy|floor" > $OUT/cuda-tests.txt; cat $OUT/cuda-tests.txt ;;
sweep) T=300 t --ignored --exact longctx::cuda::tests::range_split_sweep | grep -E "sweep|result|panicked" > $OUT/range-split-sweep.txt; cat $OUT/range-split-sweep.txt ;;
timings) t --ignored --exact longctx::cuda::tests::decode_step_timings | grep -v "^running\|^$" > $OUT/timings.txt; cat $OUT/timings.txt ;;
run)
  BENCH_SUITE_COMMIT=$COMMIT timeout -s INT ${LIMIT:-400} $D/bench-suite run long-context --variant decode-step --device cuda --profile full \
    --trials ${TRIALS:-5} --out $D/lc --resume --quiet --no-report 2>&1 | tail -3
  echo "records: $(wc -l < $D/lc/records.jsonl)"
  mkdir -p $OUT/lc && cp -r $D/lc/. $OUT/lc/ ;;
esac; done
exit 0
