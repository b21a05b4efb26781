#!/bin/bash
# r10 on an H200 (2026-11-29): the SLA kernels with reciprocals and the
# block's work items read once. TESTS=1: the CUDA kernel tests and the
# backward sweep. Then point-cloud-sla for the entries in ENTRIES, full
# profile, 2 trials, resumable across calls (copy $OUT/run back to
# dist/r10/run between calls).
set -u
D=$PWD/dist/r10
COMMIT=$(cat $D/COMMIT)
for b in bench-suite workloads-tests; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
export BENCH_SUITE_ASSETS=$D/assets
mkdir -p $OUT
if [ "${TESTS:-1}" = 1 ]; then
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $D/gpu.txt
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest") > $D/cuda-tests.txt
(cd $D && timeout 150 ./workloads-tests --test-threads 1 --nocapture --ignored pointcloud::cuda::tests::sla_backward_sweep 2>&1) > $D/sweep-backward.txt
cat $D/gpu.txt; grep -E "result|Broken" $D/cuda-tests.txt; grep voxels $D/sweep-backward.txt | cut -c1-200; cp $D/gpu.txt $D/cuda-tests.txt $D/sweep-backward.txt $OUT/
fi
E=""; for e in ${ENTRIES:-sla authors-triton-kernels authors-triton padded-linear-attention}; do E="$E --entry $e"; done
BENCH_SUITE_COMMIT=$COMMIT timeout -s INT ${LIMIT:-300} $D/bench-suite run point-cloud-sla --device cuda --profile full --trials 2 \
  $E --out $D/run --resume --quiet --no-report 2>&1 | tail -3
echo "records: $(wc -l < $D/run/records.jsonl)"
mkdir -p $OUT/run && cp -r $D/run/. $OUT/run/
true
