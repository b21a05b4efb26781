#!/bin/bash
# Session 2026-11-28 evening, on one H200. Stages (argument):
#   tests : the decoder tests' GPU half (module gpu::, tiny random models:
#           the sink window's eviction and Quest's rule against the CPU caches)
#   ls    : list the model parts present
#   ab    : join and verify Qwen 0.5B; gpu_call_costs with the test binaries
#           before (decoder-old, 2a9d7b3) and after (decoder-new, 30e539a)
#           the event-tracking change, alternated, 3 rounds
#   needle: full-profile needle, dense / sink-window / block-topk, new binary
#   old   : full-profile needle, dense, the binary of c85f070 (published run)
#   ppl   : join SmolLM2; full-profile perplexity, the three entries, new binary
set -u
D=$PWD/dist/ab; P=$PWD/dist/gn/parts; A=$PWD/dist/gn/assets
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
export BENCH_SUITE_ASSETS=$A
unx() { [ -x $D/$1 ] || { xz -dc $2 > $D/$1.tmp && chmod +x $D/$1.tmp && mv $D/$1.tmp $D/$1; }; }
unx decoder-old $D/decoder-old.xz; unx decoder-new $D/decoder-new.xz
unx bench-suite $D/bench-suite-new.xz
[ -f $PWD/dist/gn/bench-suite.xz ] && unx bench-suite-old $PWD/dist/gn/bench-suite.xz
join() { # name sha parts...
  local m=$A/$1 sha=$2; shift 2
  [ -f $m ] || { cat "$@" > $m.tmp && mv $m.tmp $m; }
  echo "$sha  $m" | sha256sum -c || exit 2
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
case "${1:-ls}" in
tests)
  (cd $D && timeout 300 ./decoder-new --test-threads 1 --nocapture gpu:: 2>&1) > $OUT/decoder-gpu-tests.txt
  grep -E "^test |result|panicked|error" $OUT/decoder-gpu-tests.txt ;;
ls) ls -la $P $A | tee $OUT/parts.txt ;;
ab)
  join qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 $P/q0{0..8}
  for r in 1 2 3; do for b in old new; do
    echo "== round $r: $b" | tee -a $OUT/call-costs.txt
    (cd $D && timeout 120 ./decoder-$b --ignored --nocapture --exact gpu_real::gpu_call_costs 2>&1) | grep -v "^running\|^$" | tee -a $OUT/call-costs.txt
  done; done ;;
needle|old)
  join qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 $P/q0{0..8}
  if [ $1 = needle ]; then B=bench-suite; C=$(cat $D/COMMIT); E="--entry dense --entry sink-window --entry block-topk"
  else B=bench-suite-old; C=c85f070; E="--entry dense"; fi
  BENCH_SUITE_COMMIT=$C timeout ${T:-500} $D/$B run long-context --variant needle --profile full \
    --device cuda $E --quiet --out $D/out-$1 --resume 2>&1 | tail -20 | tee $OUT/run-$1.txt
  tar czf $OUT/out-$1.tar.gz -C $D out-$1 ;;
ppl)
  join SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 $P/s0{0..1}
  BENCH_SUITE_COMMIT=$(cat $D/COMMIT) timeout ${T:-500} $D/bench-suite run long-context --variant perplexity --profile full \
    --device cuda --entry dense --entry sink-window --entry block-topk --quiet --out $D/out-ppl --resume 2>&1 | tail -20 | tee $OUT/run-ppl.txt
  tar czf $OUT/out-ppl.tar.gz -C $D out-ppl ;;
esac
