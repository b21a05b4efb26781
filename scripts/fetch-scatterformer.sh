#!/usr/bin/env bash
# Fetches the ScatterFormer authors' Triton kernels for the point-cloud-sla peer.
#
#   scripts/fetch-scatterformer.sh
#
# Source, the first that is set:
#   SCATTERFORMER_SRC=/path/scatterformer_utils.py  a copy fetched elsewhere
#   SCATTERFORMER_GIT=/path/to/repo.git             a local clone or mirror
#                                                   (read with `git show`)
#   (neither)                                       raw.githubusercontent.com
#
# ScatterFormer (He et al., arXiv 2401.00912) publishes its Scattered Linear
# Attention kernels in pcdet/models/model_utils/scatterformer_utils.py. We do
# not vendor that file (it is the authors' code, and the peer must be exactly
# their code at one commit); scripts/peer_sla.py loads it from
# ${BENCH_SUITE_ASSETS:-<repo>/.assets}/scatterformer/ (git-ignored), and
# refuses a file whose sha256 differs from the one pinned here and there.
#
# The file is written to a temporary name and renamed only once its sha256
# matched, so an interrupted or wrong fetch never leaves a file behind that
# the peer would load. One line on stdout: `cached PATH` or `fetched PATH`.
# Any failure exits non-zero with the reason on stderr.
set -euo pipefail
trap 'exit 130' INT TERM

commit=a23f434f8fd1f0f2913532e75a614c91f49dc7eb
path=pcdet/models/model_utils/scatterformer_utils.py
# sha256 of the file at $commit (19159 bytes); scripts/peer_sla.py pins the
# same value (PINNED_SHA256) and scripts/test_peer_sla.py checks they agree.
sha256=85e4b6c24ed9823b080b78a56698501eabb675e3b10c5dbcf7125b6fcd1d96d8
url=https://raw.githubusercontent.com/skyhehe123/ScatterFormer/$commit/$path

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest_dir=${BENCH_SUITE_ASSETS:-$repo/.assets}/scatterformer
dest=$dest_dir/scatterformer_utils.py

die() {
  echo "fetch-scatterformer: $*" >&2
  exit 1
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f $dest ]]; then
  if [[ $(sha_of "$dest") == "$sha256" ]]; then
    echo "cached $dest"
    exit 0
  fi
  echo "fetch-scatterformer: $dest does not match the pinned sha256; fetching it again" >&2
fi

mkdir -p "$dest_dir" || die "cannot create $dest_dir"
tmp=$(mktemp "$dest_dir/.scatterformer_utils.py.XXXXXX") || die "cannot create a temporary file in $dest_dir"
trap 'rm -f "$tmp"' EXIT

if [[ -n ${SCATTERFORMER_SRC:-} ]]; then
  source_desc="$SCATTERFORMER_SRC"
  [[ -f $SCATTERFORMER_SRC ]] || die "SCATTERFORMER_SRC=$SCATTERFORMER_SRC is not a file"
  cp "$SCATTERFORMER_SRC" "$tmp" || die "cannot copy $SCATTERFORMER_SRC"
elif [[ -n ${SCATTERFORMER_GIT:-} ]]; then
  source_desc="$SCATTERFORMER_GIT ($commit:$path)"
  git -C "$SCATTERFORMER_GIT" show "$commit:$path" >"$tmp" ||
    die "git show $commit:$path failed in SCATTERFORMER_GIT=$SCATTERFORMER_GIT (is the commit in that repository?)"
else
  source_desc="$url"
  command -v curl >/dev/null || die "curl not found; install it, or set SCATTERFORMER_GIT to a local clone"
  curl -fsSL --retry 2 -o "$tmp" "$url" ||
    die "download failed: $url (offline? set SCATTERFORMER_GIT=/path/to/ScatterFormer.git or SCATTERFORMER_SRC=/path/to/the/file)"
fi

got=$(sha_of "$tmp")
if [[ $got != "$sha256" ]]; then
  die "sha256 mismatch for $source_desc: expected $sha256, got $got ($(stat -c %s "$tmp") bytes); not installed"
fi

# mktemp made it private (0600); an asset is as readable as any other file.
chmod 0644 "$tmp"
mv -f "$tmp" "$dest" || die "cannot move the file into $dest"
trap - EXIT
echo "fetched $dest"
