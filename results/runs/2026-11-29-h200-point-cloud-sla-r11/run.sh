#!/bin/bash
# r11 on an H200 (2026-11-29, ninth session): r10 with the autotuner also
# trying 24, 48, 96, 192 voxels a warp. TESTS=1: the CUDA kernel tests, the
# forward (autotuned) and backward sweeps. Then point-cloud-sla for the entries in ENTRIES, full
# profile, 2 trials, resumable across calls (copy $OUT/run back to
# dist/r11/run between calls).
set -u
D=$PWD/dist/r11
COMMIT=$(cat $D/COMMIT)
for b in bench-suite workloads-tests; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
export BENCH_SUITE_ASSETS=$D/assets
mkdir -p $OUT
if [ "${TESTS:-1}" = 1 ]; then
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $D/gpu.txt
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest") > $D/cuda-tests.txt
(cd $D && timeout 150 ./workloads-tests --test-threads 1 --nocapture --ignored pointcloud::cuda::tests::sla_backward_sweep 2>&1) > $D/sweep-backward.txt
(cd $D && BENCH_SUITE_SLA_SWEEP_SMALL=auto timeout 150 ./workloads-tests --test-threads 1 --nocapture --ignored --exact pointcloud::cuda::tests::sla_forward_sweep 2>&1) > $D/sweep-forward.txt
cat $D/gpu.txt; grep -E "result|Broken" $D/cuda-tests.txt; grep voxels $D/sweep-backward.txt | cut -c1-200; grep -E "voxels|autotuned" $D/sweep-forward.txt | grep -v SlaFfma | cut -c1-160; cp $D/gpu.txt $D/cuda-tests.txt $D/sweep-backward.txt $D/sweep-forward.txt $OUT/
fi
E=""; for e in ${ENTRIES:-sla authors-triton-kernels authors-triton padded-linear-attention}; do E="$E --entry $e"; done
BENCH_SUITE_COMMIT=$COMMIT timeout -s INT ${LIMIT:-300} $D/bench-suite run point-cloud-sla --device cuda --profile full --trials 2 \
  $E --out $D/run --resume --quiet --no-report 2>&1 | tail -3
echo "records: $(wc -l < $D/run/records.jsonl)"
mkdir -p $OUT/run && cp -r $D/run/. $OUT/run/
true
