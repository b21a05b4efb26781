#!/bin/bash
# Dense at 4k: forms of the ring-of-8 kernel chosen through
# BENCH_SUITE_DEEP_KERNEL (experiment build): tma8 (built-in), tma8w (8
# warps), tma8c (cluster-of-16 combine, 4 warps), tma8wc (both).
# Stages: tests (kernel tests with each form), ab (decode_step_timings at
# 4k and 16k, alternating, two rounds).
set -u
D=$PWD/dist/lc5
for b in workloads-tests; do [ -f $D/$b.xz ] && xz -df $D/$b.xz && chmod +x $D/$b; done
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
t() { local bin=$1; shift; (cd $D && timeout ${T:-200} ./$bin --test-threads 1 --nocapture "$@" 2>&1); }
FORMS=${FORMS:-tma8 tma8w tma8c tma8wc}
for stage in "$@"; do case $stage in
tests) for f in $FORMS; do echo "== $f"; BENCH_SUITE_DEEP_KERNEL=$f t workloads-tests longctx::cuda::tests::every_kind longctx::cuda::tests::a_kernel | grep -E "test |error|result|panicked|dense 1.00 n=4096|n=4096"; done > $OUT/cuda-tests.txt; grep -E "==|result|panicked|dense 1.00 n=4096" $OUT/cuda-tests.txt ;;
ab) for r in 1 2; do for f in $FORMS; do
      echo "== $f"; BENCH_SUITE_DEEP_KERNEL=$f LONGCTX_CONTEXTS=${CTX:-4096,16384} t workloads-tests --ignored --exact longctx::cuda::tests::decode_step_timings | grep -v "^running\|^$"
    done; done > $OUT/ab.txt; grep -E "^==|^dense|^sink" $OUT/ab.txt ;;
esac; done
exit 0
