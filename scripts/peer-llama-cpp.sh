#!/usr/bin/env bash
# Peer comparison: measure llama.cpp (through llama-cpp-python) on the same
# GGUF files the suite uses, with the same thread count, so the suite's own
# decoder numbers can be read against a well-known CPU implementation.
#
# What it measures, per model (SmolLM2-135M, Qwen2.5-Coder 0.5B and 1.5B):
#   - decode tokens/s: greedy, one token per llama_decode, after a short prompt
#   - prompt-processing tokens/s: one 512-token prompt in one batch
#   - the cost of one batched evaluation of 5 and of 9 tokens (logits at every
#     position) on top of a cached prefix, relative to one token: what batched
#     verification in speculative decoding costs
# Each is the median over a few repetitions, after a warm-up.
#
# The suite's own decoder is measured the same way in the same run
# (workloads/benches/decoder.rs, built here with cargo), alternating with
# llama.cpp for PEER_ROUNDS rounds so drift on a shared machine hits both;
# scripts/peer_compare.py then writes comparison.md / comparison.json with
# our share of llama.cpp's figures (goal: at least two thirds).
#
# Usage: scripts/peer-llama-cpp.sh [OUT_DIR]   (default results/peer-llama-cpp/)
#   --install-only     build/reuse the virtualenv and stop
#   --peer-only        measure llama.cpp only (one round, no comparison)
# Environment:
#   PEER_THREADS   threads for llama.cpp (default 2, as in the suite's CPU runs)
#   PEER_REPS      repetitions per measurement (default 5)
#   PEER_ROUNDS    rounds of llama.cpp then ours (default 2)
#   PEER_VENV      virtualenv path (default .venv-peer/ in the repository root)
#   LLAMA_CPP_PYTHON_VERSION   pinned version to install (default 0.3.36)
#   PEER_CMAKE_ARGS            extra CMake arguments for a source build
#
# The virtualenv is reused when it already holds the pinned version, so a
# second run skips the (long, ~10+ min on 2 cores) source build.
set -euo pipefail

die() { echo "peer-llama-cpp: error: $*" >&2; exit 1; }
log() { echo "peer-llama-cpp: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

INSTALL_ONLY=0
PEER_ONLY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --install-only) INSTALL_ONLY=1 ;;
    --peer-only) PEER_ONLY=1 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *) [[ -z "$OUT" ]] || die "more than one output path given ('$OUT', '$arg')"; OUT="$arg" ;;
  esac
done
OUT="${OUT:-results/peer-llama-cpp}"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
THREADS="${PEER_THREADS:-2}"
REPS="${PEER_REPS:-5}"
ROUNDS="${PEER_ROUNDS:-2}"
PY="$VENV/bin/python"
BUILD_INFO="$VENV/llama-cpp-python-install.json"
ASSETS="$ROOT/.assets"

[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "PEER_THREADS must be a positive integer, got '$THREADS'"
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "PEER_REPS must be a positive integer, got '$REPS'"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "PEER_ROUNDS must be a positive integer, got '$ROUNDS'"

installed_version() {
  [[ -x "$PY" ]] || return 1
  "$PY" - <<'EOF' 2>/dev/null
import llama_cpp
print(llama_cpp.__version__)
EOF
}

install_llama_cpp_python() {
  command -v python3 >/dev/null || die "python3 not found; install Python 3.9+ first"
  if [[ ! -x "$PY" ]]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  fi
  # The venv's bin first, so a pip-installed cmake/ninja is what the build finds.
  export PATH="$VENV/bin:$PATH"
  "$PY" -m pip install --quiet --upgrade pip

  # Prefer a wheel; PyPI ships only an sdist for Linux x86-64 (checked for
  # 0.3.36 with `pip download llama-cpp-python --no-deps`), so in practice
  # this builds llama.cpp from source and needs cmake >= 3.21 and a C/C++
  # compiler. The sdist is downloaded first so the vendored llama.cpp commit
  # can be read from the git metadata it carries.
  local kind="wheel" dist="$VENV/dist" pkg commit=""
  rm -rf "$dist" && mkdir -p "$dist"
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
        -d "$dist" "llama-cpp-python==$VERSION" >/dev/null 2>&1; then
    kind="source build"
    "$PY" -m pip download --quiet --no-deps --no-binary=llama-cpp-python \
        -d "$dist" "llama-cpp-python==$VERSION" \
      || die "could not download llama-cpp-python==$VERSION (no wheel and no sdist) from PyPI"
    command -v cc >/dev/null && command -v c++ >/dev/null \
      || die "no C/C++ compiler for the source build (on Debian: apt-get install build-essential)"
    if ! cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=21))}'; then
      log "cmake >= 3.21 not found; installing cmake from PyPI into the venv"
      "$PY" -m pip install --quiet "cmake>=3.21"
    fi
    command -v ninja >/dev/null || "$PY" -m pip install --quiet ninja
  fi
  pkg="$(ls "$dist"/llama_cpp_python-"$VERSION"* 2>/dev/null | head -n 1)"
  [[ -n "$pkg" ]] || die "pip download left no llama_cpp_python-$VERSION file in $dist"
  if [[ "$pkg" == *.tar.gz ]]; then
    commit="$(tar -xzOf "$pkg" "llama_cpp_python-$VERSION/.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null || true)"
  fi

  # Only the shared library is needed: no multimodal (mtmd) library, tools,
  # examples, tests or server. GGML_NATIVE tunes for this CPU, as a local
  # llama.cpp build does; the numbers are for this machine only.
  export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF ${PEER_CMAKE_ARGS:-}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  log "installing llama-cpp-python==$VERSION ($kind; log: $VENV/install.log)"
  local t0 t1
  t0=$(date +%s)
  if ! "$PY" -m pip install --no-cache-dir --verbose "$pkg" >"$VENV/install.log" 2>&1; then
    tail -n 40 "$VENV/install.log" >&2
    die "pip install llama-cpp-python==$VERSION failed; full log in $VENV/install.log"
  fi
  t1=$(date +%s)
  "$PY" - "$BUILD_INFO" "$VERSION" "$kind" "$((t1 - t0))" "$CMAKE_ARGS" "$commit" "$(basename "$pkg")" <<'EOF'
import json, sys
path, version, kind, secs, cmake_args, commit, pkg = sys.argv[1:]
json.dump({"version": version, "kind": kind, "package_file": pkg,
           "install_s": int(secs), "cmake_args": cmake_args.split(),
           "llama_cpp_commit": commit.strip() or None}, open(path, "w"), indent=2)
EOF
  log "installed in $((t1 - t0)) s"
}

have="$(installed_version || true)"
if [[ "$have" == "$VERSION" ]]; then
  log "reusing $VENV (llama-cpp-python $have)"
else
  [[ -z "$have" ]] || log "venv has llama-cpp-python $have, want $VERSION: reinstalling"
  install_llama_cpp_python
  have="$(installed_version)" || die "llama_cpp does not import after install; see $VENV/install.log"
  [[ "$have" == "$VERSION" ]] || die "installed llama-cpp-python is $have, expected $VERSION"
fi
[[ "$INSTALL_ONLY" == 1 ]] && exit 0

MODELS=(
  "smollm2-135m=$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"
  "qwen2.5-coder-0.5b=$ASSETS/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  "qwen2.5-coder-1.5b=$ASSETS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
)
for m in "${MODELS[@]}"; do
  [[ -f "${m#*=}" ]] || die "model file ${m#*=} missing; run scripts/fetch-assets.sh first"
done
TEXT="$ASSETS/jargon.txt.gz"
[[ -f "$TEXT" ]] || die "$TEXT missing (prompt text); run scripts/fetch-assets.sh first"

[[ ! -e "$OUT" || -d "$OUT" ]] || die "output '$OUT' exists and is not a directory (the output is now a directory of round files)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"   # cargo runs the bench from workloads/

peer_round() {
  "$PY" "$ROOT/scripts/peer_llama_cpp.py" \
    --out "$1" --threads "$THREADS" --reps "$REPS" \
    --text "$TEXT" --install-info "$BUILD_INFO" \
    "${MODELS[@]/#/--model=}"
}

if [[ "$PEER_ONLY" == 1 ]]; then
  peer_round "$OUT/llama-cpp-round1.json"
  exit 0
fi

command -v cargo >/dev/null || die "cargo not found; install Rust (rustup) to measure the suite's decoder, or pass --peer-only"
log "building the suite's decoder benchmark (release)"
cargo bench -p workloads --bench decoder --no-run >/dev/null 2>"$OUT/cargo-build.log" \
  || { tail -n 20 "$OUT/cargo-build.log" >&2; die "cargo bench --no-run failed; log in $OUT/cargo-build.log"; }
rm -f "$OUT"/llama-cpp-round*.json "$OUT"/ours-round*.json
for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r of $ROUNDS: llama.cpp"
  peer_round "$OUT/llama-cpp-round$r.json"
  log "round $r of $ROUNDS: ours"
  CANDLE_NUM_THREADS="$THREADS" cargo bench -q -p workloads --bench decoder -- \
    --reps="$REPS" --json="$OUT/ours-round$r.json" \
    smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b >&2
done
python3 "$ROOT/scripts/peer_compare.py" "$OUT"
