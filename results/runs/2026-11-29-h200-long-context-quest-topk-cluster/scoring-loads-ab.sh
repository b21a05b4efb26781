#!/bin/bash
# Quest scoring variants: a.cu (committed), u8.cu (8 rounds of loads in flight per thread), cs.cu (streaming loads of the metadata).
set -u
D=$PWD/dist/cl2; B=$PWD/dist/lc8
[ -f $B/workloads-tests.xz ] && xz -df $B/workloads-tests.xz && chmod +x $B/workloads-tests
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
t() { (cd $B && timeout 200 ./workloads-tests --test-threads 1 --nocapture "$@" 2>&1); }
export LONGCTX_CONTEXTS=${CTX:-4096,65536,524288}
for k in ${ORDER:-a b c c b a}; do
  echo "== $k" | tee -a $OUT/timings-ab.txt
  BENCH_SUITE_DECODE_ATTN_CU=$D/$k.cu t --ignored --exact longctx::cuda::tests::decode_step_timings | grep -E "block-topk|top-k on|dense  " | tee -a $OUT/timings-ab.txt
done
