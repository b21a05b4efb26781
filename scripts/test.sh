#!/usr/bin/env bash
# The test command: fetches the small assets the tests read (the Jargon
# File, 0.65 MB, verified by sha256), then runs every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/fetch-assets.sh" jargon
cargo test --workspace --locked "$@"
