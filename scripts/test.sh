#!/usr/bin/env bash
# The test command: fetches the small assets the tests read (the Jargon
# File, 0.65 MB, and SmolLM2-135M, 98 MB, both verified by sha256), then
# runs every test of the workspace. Tests on the larger Qwen models skip
# with a notice unless `scripts/fetch-assets.sh qwen-0.5b qwen-1.5b` ran.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/fetch-assets.sh" jargon smollm2
cargo test --workspace --locked "$@"
