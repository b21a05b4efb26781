#!/bin/bash
# Nsight Compute over Quest's two top-k kernels at 512k, 10%: one launch each
# from decode_step_timings (LONGCTX_CONTEXTS=524288).
set -u
D=$PWD/dist/cl1
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
[ -f $D/workloads-tests.xz ] && xz -df $D/workloads-tests.xz && chmod +x $D/workloads-tests
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
export LONGCTX_CONTEXTS=${CTX:-524288}
for k in topk_select topk_select_cluster; do
  timeout -s INT 200 $NCU --kernel-name $k --launch-skip 3 --launch-count 1 --cache-control all --clock-control none \
    --set full --import-source no --kill yes $D/workloads-tests --test-threads 1 --nocapture --ignored --exact longctx::cuda::tests::decode_step_timings > $OUT/ncu-$k.txt 2>&1
  echo "$k rc $?"; grep -E "Duration|Elapsed Cycles|Registers Per|Achieved Occupancy|Issued Ipc|Warp Cycles Per Issued|Block Size|Grid Size|Dynamic Shared|Cluster" $OUT/ncu-$k.txt | head -24
done
