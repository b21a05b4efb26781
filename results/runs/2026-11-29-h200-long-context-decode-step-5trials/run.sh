#!/bin/bash
# 2026-11-29 on an H200: the long-context CUDA tests, the decode-step
# timing table, then `bench-suite run long-context --variant decode-step`
# (full profile, 5 trials) at the commit in COMMIT.
set -u
D=$PWD/dist/lc5
COMMIT=$(cat $D/COMMIT)
for b in bench-suite workloads-tests; do [ -f $D/$b.gz ] && gunzip -f $D/$b.gz && chmod +x $D/$b; done
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } > $OUT/gpu.txt
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture longctx::cuda::tests 2>&1 | grep -E "test |error|result|panicked|copy|floor") > $OUT/cuda-tests.txt
(cd $D && timeout 100 ./workloads-tests --test-threads 1 --nocapture --ignored --exact longctx::cuda::tests::decode_step_timings 2>&1 | grep -v "^running\|^$") > $OUT/timings.txt
cat $OUT/gpu.txt $OUT/cuda-tests.txt $OUT/timings.txt
BENCH_SUITE_COMMIT=$COMMIT timeout -s INT ${LIMIT:-330} $D/bench-suite run long-context --variant decode-step --device cuda --profile full \
  --trials ${TRIALS:-5} --out $D/lc --resume --quiet --no-report 2>&1 | tail -3
echo "records: $(wc -l < $D/lc/records.jsonl)"
mkdir -p $OUT/lc && cp -r $D/lc/. $OUT/lc/
exit 0
