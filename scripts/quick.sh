#!/usr/bin/env bash
# The main job on embedded defaults: fetch and verify the quick profile's
# assets, build the release binary, run the whole suite's quick profile on
# the CPU and render its report.
#   scripts/quick.sh [extra bench-suite suite options]
# Results land in results/quick/<timestamp>/ (summary.md, charts/, raw.csv,
# records.jsonl, run.json); results/quick/latest points at the newest run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/fetch-assets.sh" jargon smollm2
cargo build --release --locked -p bench-suite
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="results/quick/$stamp"
./target/release/bench-suite suite --profile quick --device cpu --out "$out" "$@"
ln -sfn "$stamp" results/quick/latest
echo "quick suite done: $out/summary.md"
