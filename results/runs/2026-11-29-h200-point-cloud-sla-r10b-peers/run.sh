#!/bin/bash
# r10b on an H200 (2026-11-29): the peers r10 did not run (padded softmax
# window attention and the PyTorch index_add_ operator) beside `sla`, on the
# Waymo-like and nuScenes-like frames, with r10's binary (6aa2cd8).
set -u
D=$PWD/dist/r10
for b in bench-suite; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
export BENCH_SUITE_ASSETS=$D/assets
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
BENCH_SUITE_COMMIT=$(cat $D/COMMIT) timeout -s INT ${LIMIT:-250} $D/bench-suite run point-cloud-sla --device cuda --profile full --trials 2 \
  --variant waymo-like --variant nuscenes-like --entry sla --entry padded-window-attention --entry pytorch-scatter \
  --out $D/peers --resume --quiet --no-report 2>&1 | tail -4
echo "records: $(wc -l < $D/peers/records.jsonl)"
mkdir -p $OUT/peers && cp -r $D/peers/. $OUT/peers/
true
