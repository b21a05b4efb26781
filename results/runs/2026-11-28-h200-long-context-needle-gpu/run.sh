#!/bin/bash
# End-to-end needle grid and perplexity on the GPU decoder (issue 5): the
# models arrive in parts over several calls (Qwen2.5-Coder-0.5B as
# parts/q00..q08, SmolLM2-135M as parts/s00..s01); this script lists the
# parts present and, with `run`, joins and verifies them (sha256), then
# runs the full-profile needle and perplexity variants for dense,
# sink-window and block-topk with --device cuda.
set -u
D=$PWD/dist/gn
mkdir -p $OUT
ls -la $D/parts | tee $OUT/parts.txt
[ "${1:-}" = run ] || exit 0
join() { # name sha parts...
  local m=$D/assets/$1 sha=$2; shift 2
  [ -f $m ] || { cat "$@" > $m.tmp && mv $m.tmp $m; }
  echo "$sha  $m" | sha256sum -c || exit 2
}
join qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 $D/parts/q0{0..8}
join SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 $D/parts/s0{0..1}
[ -x $D/bench-suite ] || { xz -dc $D/bench-suite.xz > $D/bench-suite && chmod +x $D/bench-suite; }
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
export BENCH_SUITE_ASSETS=$D/assets BENCH_SUITE_COMMIT=$(cat $D/COMMIT)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
for v in needle perplexity; do
  timeout ${T:-250} $D/bench-suite run long-context --variant $v --profile full \
    --device cuda --entry dense --entry sink-window --entry block-topk --quiet --out $D/out-$v --resume 2>&1 | tee $OUT/run-$v.txt
  echo "$v rc ${PIPESTATUS[0]}"
done
tar czf $OUT/out.tar.gz -C $D out-needle out-perplexity
