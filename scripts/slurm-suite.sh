#!/usr/bin/env bash
# The full suite as a Slurm job array: one array task per shard, then a
# dependent job that merges the shards and renders the report.
#
#   scripts/slurm-suite.sh [SHARDS] [PROFILE]      (defaults: 8 full)
#
# Submit from the repository root on a login node that shares the file
# system with the GPU nodes; adjust the #SBATCH lines (partition, GPU type)
# to your cluster. Results: results/slurm-<timestamp>/{shard-*,merged}.
set -euo pipefail
shards="${1:-8}"
profile="${2:-full}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/fetch-assets.sh all
cargo build --release --locked -p bench-suite --features cuda

run_dir="results/slurm-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$run_dir"   # Slurm opens the log files before a task starts

array_job=$(sbatch --parsable --array="1-${shards}" \
  --job-name=bench-suite --gres=gpu:1 --cpus-per-task=16 --time=06:00:00 \
  --output="${run_dir}/shard-%a.log" \
  --wrap="./target/release/bench-suite suite --profile ${profile} --device cuda --shard \$SLURM_ARRAY_TASK_ID/${shards} --out ${run_dir}/shard-\$SLURM_ARRAY_TASK_ID --no-report --quiet")

sbatch --dependency="afterany:${array_job}" --job-name=bench-suite-report \
  --output="${run_dir}/report.log" \
  --wrap="./target/release/bench-suite merge ${run_dir}/shard-* --out ${run_dir}/merged && ./target/release/bench-suite report ${run_dir}/merged"
echo "submitted array job ${array_job}; report in ${run_dir}/merged/summary.md"
