#!/bin/bash
# r9 on an H200: the CUDA tests and the backward sweep, then point-cloud-sla
# with the tensor-core backward (the default) for the entries in ENTRIES,
# resumable across calls (copy $OUT/run back to dist/r9/run between calls).
set -u
D=$PWD/dist/r9
COMMIT=$(cat $D/COMMIT)
for b in bench-suite workloads-tests; do [ -f $D/$b.gz ] && gunzip -f $D/$b.gz && chmod +x $D/$b; done
export BENCH_SUITE_ASSETS=$D/assets
mkdir -p $OUT
if [ "${TESTS:-1}" = 1 ]; then
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $D/gpu.txt
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest") > $D/cuda-tests.txt
(cd $D && timeout 150 ./workloads-tests --test-threads 1 --nocapture --ignored pointcloud::cuda::tests::sla_backward_sweep 2>&1) > $D/sweep-backward.txt
cat $D/gpu.txt $D/cuda-tests.txt; tail -30 $D/sweep-backward.txt; cp $D/gpu.txt $D/cuda-tests.txt $D/sweep-backward.txt $OUT/
fi
if [ "${LONGCTX:-0}" = 1 ]; then
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture longctx::cuda::tests 2>&1 | grep -E "test |error|result|panicked|copy|floor") > $D/lc-cuda-tests.txt
cat $D/lc-cuda-tests.txt; cp $D/lc-cuda-tests.txt $OUT/
BENCH_SUITE_COMMIT=$COMMIT timeout -s INT ${LIMIT:-300} $D/bench-suite run long-context --variant decode-step --device cuda --profile full \
  --trials ${TRIALS:-5} --out $D/lc --resume --quiet --no-report 2>&1 | tail -3
echo "records: $(wc -l < $D/lc/records.jsonl)"
mkdir -p $OUT/lc && cp -r $D/lc/. $OUT/lc/
exit 0
fi
E=""; for e in ${ENTRIES:-sla authors-triton-kernels authors-triton padded-linear-attention}; do E="$E --entry $e"; done
BENCH_SUITE_COMMIT=$COMMIT timeout -s INT ${LIMIT:-300} $D/bench-suite run point-cloud-sla --device cuda --profile full --trials 2 \
  $E --out $D/run --resume --quiet --no-report 2>&1 | tail -3
echo "records: $(wc -l < $D/run/records.jsonl)"
mkdir -p $OUT/run && cp -r $D/run/. $OUT/run/
true
