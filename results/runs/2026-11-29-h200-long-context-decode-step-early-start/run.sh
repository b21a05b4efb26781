#!/bin/bash
# 2026-11-29 (seventh session) on an H200: the early start of long
# bulk-copy range steps. Binaries: workloads-tests-old (aa41165, before),
# workloads-tests and bench-suite (COMMIT, after). Stages: tests (the
# kernel tests, after), ab (decode_step_timings, before and after,
# alternating, two rounds), run (`bench-suite run long-context --variant
# decode-step --device cuda --profile full --trials 5`, resumable).
set -u
D=$PWD/dist/lc2
for b in bench-suite workloads-tests workloads-tests-old; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } > $OUT/gpu.txt
t() { local bin=$1; shift; (cd $D && timeout ${T:-200} ./$bin --test-threads 1 --nocapture "$@" 2>&1); }
for stage in "$@"; do case $stage in
tests) t workloads-tests longctx::cuda::tests | grep -E "test |error|result|panicked|copy|floor|prefetch|ring|early" > $OUT/cuda-tests.txt; tail -5 $OUT/cuda-tests.txt ;;
ab) for r in 1 2; do for b in workloads-tests-old workloads-tests; do
      echo "== $b"; t $b --ignored --exact longctx::cuda::tests::decode_step_timings | grep -v "^running\|^$"
    done; done > $OUT/ab.txt; grep -E "^==|^dense|^sink|^kv-cl|^block-topk " $OUT/ab.txt ;;
run)
  BENCH_SUITE_COMMIT=$(cat $D/COMMIT) timeout -s INT ${LIMIT:-400} $D/bench-suite run long-context --variant decode-step --device cuda --profile full \
    --trials ${TRIALS:-5} --out $D/lc --resume --quiet --no-report 2>&1 | tail -3
  echo "records: $(wc -l < $D/lc/records.jsonl)"
  mkdir -p $OUT/lc && cp -r $D/lc/. $OUT/lc/ ;;
esac; done
exit 0
