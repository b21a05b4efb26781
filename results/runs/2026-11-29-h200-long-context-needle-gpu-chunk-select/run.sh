#!/bin/bash
# GPU session of 2026-11-29 (issue 5): ChunkLLM's chunk selection on the GPU
# decoder. Stages:
#   tests   the decoder's `gpu::` tests (the new chunk_select test among
#           them) with --features gpu-decoder, on the GPU and candle's CPU;
#   parts   list the model parts that have arrived (parts/q00..q14);
#   run     join and verify Qwen2.5-Coder-0.5B (sha256), then the full
#           needle grid, 5 trials, dense, chunk-select, chunk-select-vote and
#           block-topk, --device cuda (resumable: --resume into out-needle);
#   ppl     join and verify SmolLM2-135M (parts/s00..s02), then the full
#           perplexity variant, 5 trials, the same entries and sink-window.
set -u
D=$PWD/dist/cs1
mkdir -p $OUT
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
unpack() { [ -x $D/$1 ] || { xz -dc $D/$1.xz > $D/$1 && chmod +x $D/$1; }; }
case "${1:-parts}" in
tests)
  unpack decoder-test
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
  # the tests find their assets (none needed by the gpu:: tests) here
  timeout 500 $D/decoder-test gpu:: --test-threads 1 --nocapture 2>&1 | tee $OUT/gpu-tests.txt
  echo "tests rc ${PIPESTATUS[0]}";;
parts)
  ls -la $D/parts | tee $OUT/parts.txt;;
run)
  mkdir -p $D/assets
  m=$D/assets/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
  [ -f $m ] || { cat $D/parts/q* > $m.tmp && mv $m.tmp $m; }
  echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $m" | sha256sum -c || exit 2
  unpack bench-suite
  export BENCH_SUITE_ASSETS=$D/assets BENCH_SUITE_COMMIT=$(cat $D/COMMIT)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
  timeout ${T:-540} $D/bench-suite run long-context --variant needle --profile full \
    --device cuda --entry dense --entry chunk-select --entry chunk-select-vote \
    --entry block-topk --quiet --out $D/out-needle --resume 2>&1 | tee $OUT/run-needle.txt
  echo "needle rc ${PIPESTATUS[0]}"
  tar czf $OUT/out.tar.gz -C $D out-needle;;
ppl)
  mkdir -p $D/assets
  m=$D/assets/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f $m ] || { cat $D/parts/s* > $m.tmp && mv $m.tmp $m; }
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $m" | sha256sum -c || exit 2
  unpack bench-suite
  export BENCH_SUITE_ASSETS=$D/assets BENCH_SUITE_COMMIT=$(cat $D/COMMIT)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
  timeout ${T:-540} $D/bench-suite run long-context --variant perplexity --profile full \
    --device cuda --entry dense --entry chunk-select --entry chunk-select-vote \
    --entry block-topk --entry sink-window --quiet --out $D/out-perplexity --resume 2>&1 | tee $OUT/run-perplexity.txt
  echo "perplexity rc ${PIPESTATUS[0]}"
  tar czf $OUT/out.tar.gz -C $D out-perplexity;;
esac
