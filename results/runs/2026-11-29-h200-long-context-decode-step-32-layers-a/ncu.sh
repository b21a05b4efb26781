#!/bin/bash
# Nsight Compute over Quest's top-k (topk_select) and scoring at 512k, 10%:
# one launch each from decode_step_timings (LONGCTX_CONTEXTS=524288).
set -u
D=$PWD/dist/tk
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
xz -dc $D/wl.xz > $D/wl.tmp && chmod +x $D/wl.tmp && mv $D/wl.tmp $D/wl
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; $NCU --version | tail -1
export LONGCTX_CONTEXTS=524288
for k in topk_select quest_score; do
  timeout -s INT 200 $NCU --kernel-name $k --launch-skip 3 --launch-count 1 --cache-control all --clock-control none \
    --set full --import-source no --kill yes $D/wl --test-threads 1 --nocapture --ignored --exact longctx::cuda::tests::decode_step_timings > $OUT/ncu-$k.txt 2>&1
  echo "$k rc $?"; grep -E "Duration|Elapsed Cycles|Registers Per|Achieved Occupancy|Issued Ipc|Warp Cycles Per Issued|Block Size|Grid Size|Dynamic Shared" $OUT/ncu-$k.txt | head -20
done
