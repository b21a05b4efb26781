#!/bin/bash
# The held-out `needle-1.5b` variant on the GPU decoder (issue 5):
# Qwen2.5-Coder-1.5B arrives in parts (dist/g15/parts/p00..p19) over
# several calls; this script lists the parts present and, with `run`,
# joins and verifies them (sha256), then runs the full-profile grid for
# dense, sink-window and block-topk with --device cuda.
set -u
D=$PWD/dist/g15
mkdir -p $OUT
ls $D/parts | tr '\n' ' ' | tee $OUT/parts.txt
[ "${1:-}" = run ] || exit 0
M=$D/assets/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
[ -f $M ] || { cat $D/parts/p{00..19} > $M.tmp && mv $M.tmp $M; }
echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  $M" | sha256sum -c || exit 2
[ -x $D/bench-suite ] || { xz -dc $D/bench-suite.xz > $D/bench-suite && chmod +x $D/bench-suite; }
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
export BENCH_SUITE_ASSETS=$D/assets BENCH_SUITE_COMMIT=$(cat $D/COMMIT)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout ${T:-500} $D/bench-suite run long-context --variant needle-1.5b --profile full \
  --device cuda --entry dense --entry sink-window --entry block-topk --quiet --out $D/out --resume 2>&1 | tee $OUT/run-log.txt
echo "rc ${PIPESTATUS[0]}"
tar czf $OUT/out.tar.gz -C $D out
