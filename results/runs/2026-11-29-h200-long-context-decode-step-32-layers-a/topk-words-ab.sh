#!/bin/bash
# Quest's top-k with 16-byte key words and warp scans (new.cu) against the
# committed kernels (old.cu): the CUDA tests with new.cu, then two
# alternating rounds of decode_step_timings at 4k, 128k and 512k.
set -u
D=$PWD/dist/lc6; S=$PWD/dist/tk2
for b in workloads-tests; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
t() { (cd $D && timeout 200 ./workloads-tests --test-threads 1 --nocapture "$@" 2>&1); }
BENCH_SUITE_DECODE_ATTN_CU=$S/new.cu t longctx::cuda::tests | grep -E "^test |result|panicked|swaps" > $OUT/tests-new.txt; cat $OUT/tests-new.txt
export LONGCTX_CONTEXTS=4096,131072,524288
for r in 1 2; do for k in new old; do
  echo "== round $r: $k" | tee -a $OUT/timings-ab.txt
  BENCH_SUITE_DECODE_ATTN_CU=$S/$k.cu t --ignored --exact longctx::cuda::tests::decode_step_timings | grep -E "block-topk|dense  " | tee -a $OUT/timings-ab.txt
done; done
