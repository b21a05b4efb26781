#!/bin/bash
# Where the Quest kernels let the next one be scheduled (griddepcontrol.
# launch_dependents): a.cu at the start of every kernel (committed), b.cu
# quest_score after its pages are scored, c.cu b and both top-k kernels
# before their compaction. decode_step_timings at 4k, 64k and 512k, rounds
# a b c, then c b a.
set -u
D=$PWD/dist/cl1
[ -f $D/workloads-tests.xz ] && xz -df $D/workloads-tests.xz && chmod +x $D/workloads-tests
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
t() { (cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture "$@" 2>&1); }
export LONGCTX_CONTEXTS=${CTX:-4096,65536,524288}
for k in ${ORDER:-a b c c b a}; do
  echo "== $k" | tee -a $OUT/timings-ab.txt
  BENCH_SUITE_DECODE_ATTN_CU=$D/$k.cu t --ignored --exact longctx::cuda::tests::decode_step_timings | grep -E "block-topk|top-k on|dense  " | tee -a $OUT/timings-ab.txt
done
