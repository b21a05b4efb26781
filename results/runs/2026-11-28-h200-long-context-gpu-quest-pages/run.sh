#!/bin/bash
# Session 2026-11-28 evening, second and third rounds (third: Quest through
# the page list, commit in COMMIT), on one H200. Stages (argument):
#   tests : the decoder tests' GPU half (module gpu::, tiny random models,
#           now through the split-K kernel) and split_attention_matches_float64
#   ls    : list the model parts present
#   ab    : join and verify Qwen 0.5B; gpu_call_costs with decode attention
#           through cuBLAS (BENCH_SUITE_GPU_ATTN=cublas) and through the
#           split-K kernel, alternated, 3 rounds
#   needle: full-profile needle, dense / sink-window / block-topk, split-K
#   blas  : the same through cuBLAS
#   ppl   : join SmolLM2; full-profile perplexity, the three entries
set -u
D=$PWD/dist/ab; P=$PWD/dist/gn/parts; A=$PWD/dist/gn/assets
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
export BENCH_SUITE_ASSETS=$A BENCH_SUITE_COMMIT=$(cat $D/COMMIT)
unx() { [ -x $D/$1 ] || { xz -dc $2 > $D/$1.tmp && chmod +x $D/$1.tmp && mv $D/$1.tmp $D/$1; }; }
unx decoder-new $D/decoder-new.xz; unx bench-suite $D/bench-suite-new.xz
join() { # name sha parts...
  local m=$A/$1 sha=$2; shift 2
  [ -f $m ] || { cat "$@" > $m.tmp && mv $m.tmp $m; }
  echo "$sha  $m" | sha256sum -c || exit 2
}
qwen() { join qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 $P/q0{0..8}; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
run() { # out-name extra-env...
  local o=$1; shift
  env "$@" timeout ${T:-280} $D/bench-suite run long-context --variant $V --profile full \
    --device cuda --entry dense --entry sink-window --entry block-topk --quiet --out $D/out-$o --resume 2>&1 | tail -5 | tee $OUT/run-$o.txt
  tar czf $OUT/out-$o.tar.gz -C $D out-$o
}
case "${1:-ls}" in
tests)
  (cd $D && timeout 300 ./decoder-new --test-threads 1 --nocapture gpu:: split_attention 2>&1) > $OUT/decoder-gpu-tests.txt
  grep -E "^test |group|result|panicked|error" $OUT/decoder-gpu-tests.txt ;;
ls) ls -la $P $A | tee $OUT/parts.txt ;;
ab)
  qwen
  for r in 1 2 3; do for b in cublas split; do
    echo "== round $r: $b" | tee -a $OUT/call-costs.txt
    (cd $D && BENCH_SUITE_GPU_ATTN=$b timeout 120 ./decoder-new --ignored --nocapture --exact gpu_real::gpu_call_costs 2>&1) | grep -v "^running\|^$\|skipped" | tee -a $OUT/call-costs.txt
  done; done ;;
needle) qwen; V=needle run needle BENCH_SUITE_GPU_ATTN=split ;;
blas) qwen; V=needle run needle-cublas BENCH_SUITE_GPU_ATTN=cublas ;;
ppl)
  join SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 $P/s0{0..1}
  V=perplexity run ppl BENCH_SUITE_GPU_ATTN=split ;;
esac
