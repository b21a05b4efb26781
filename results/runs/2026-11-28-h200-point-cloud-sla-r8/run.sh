#!/bin/bash
# r8 on an H200: the CUDA tests, then an A/B of sla (r7's binary, grouped
# autotuning only, against this commit's, grouped + cluster) alternating
# twice, then the baselines and the authors' kernels with this commit's.
set -u
D=$PWD/dist/r8b
for b in bench-suite bench-suite-r7 workloads-tests; do [ -f $D/$b.gz ] && gunzip -f $D/$b.gz && chmod +x $D/$b; done
export BENCH_SUITE_ASSETS=$D/assets
mkdir -p $OUT
if [ "${TESTS:-1}" = 1 ]; then
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $D/gpu.txt
(cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture pointcloud::cuda::tests 2>&1 | grep -E "test |error|result|panicked|host sleep|copy:|largest") > $D/cuda-tests.txt
cat $D/gpu.txt $D/cuda-tests.txt; cp $D/gpu.txt $D/cuda-tests.txt $OUT/
fi
ab() { # binary commit dir
  BENCH_SUITE_COMMIT=$2 timeout -s INT ${AB_S:-110} $D/$1 run point-cloud-sla --device cuda --profile full --trials 2 \
    --entry sla --out $D/$3 --quiet --no-report 2>&1 | tail -2
}
if [ "${AB:-1}" = 1 ]; then
  for round in 1 2; do
    ab bench-suite-r7 0dba49e ab-r7-$round; ab bench-suite $COMMIT ab-r8-$round
    cat $D/ab-*/records.jsonl > $OUT/ab-records.jsonl; date -u
  done
fi
E=""; for e in ${ENTRIES:-sla padded-linear-attention authors-triton-kernels padded-window-attention}; do E="$E --entry $e"; done
BENCH_SUITE_COMMIT=$COMMIT timeout -s INT ${LIMIT:-300} $D/bench-suite run point-cloud-sla --device cuda --profile full --trials 2 \
  $E --out $D/run --resume --quiet --no-report 2>&1 | tail -3
echo "records: $(wc -l < $D/run/records.jsonl)"
mkdir -p $OUT/run && cp -r $D/run/. $OUT/run/
true
