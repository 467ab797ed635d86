#!/usr/bin/env bash
# Collect every file the CPU trainer image installs (requirements/lock-cpu.txt: the same files, checked against
# the same sha256 the image's `pip install --require-hashes` checks) into a folder with this machine's pip, and
# index it (PEP 503) so that a build can install from it alone:
#   images/wheelhouse.sh [DIR]             # default ~/.cache/recsys/wheelhouse (outside the repository, so
#                                          # that fresh clones on the same machine, like CI's, reuse it)
#   WHEELHOUSE=DIR images/build.sh         # serves DIR on 127.0.0.1 to the build (see build.sh)
# Why: where the PyTorch CPU index cannot be reached, pip inside the build would fetch torch and its GBs of
# nvidia-* wheels from PyPI for every cold build; this machine's pip already has those files in its cache or
# local indexes, so collecting them here is a copy, and the build then needs no network at all.
# The few distributions published as sources only (the lock's header names them) stay sources: the image
# builds them, as it would from PyPI, so the wheelhouse also holds their build backend (setuptools, wheel).
# Skipped when DIR was collected from the same lock (FORCE=1 collects again).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${1:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/recsys/wheelhouse}"
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
LOCK=requirements/lock-cpu.txt
key="$(sha256sum "$LOCK" | cut -c1-16)"

if [[ "${FORCE:-0}" != "1" && -f "$DIR/.requirements-$key" ]]; then
  echo "wheelhouse: $DIR is up to date ($(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l) wheels)"
  exit 0
fi
rm -rf "$DIR"
mkdir -p "$DIR"
start=$SECONDS
# (The grep drops pip's warnings about local index folders that lack a project: noise, not a problem.)
"$PY" -m pip download -q --no-deps --require-hashes -d "$DIR" -r "$LOCK" 2> >(grep -v "is ignored: it is neither" >&2)
# What pip's build isolation installs to build the lock's source distributions inside the image.
"$PY" -m pip download -q --no-deps --only-binary :all: -d "$DIR" setuptools wheel 2> >(grep -v "is ignored: it is neither" >&2)

shopt -s nullglob
# A PEP 503 "simple" index over the flat folder: simple/<normalized name>/index.html -> ../../<file>.
for path in "$DIR"/*.whl "$DIR"/*.tar.gz; do
  file="$(basename "$path")"
  if [[ "$file" == *.whl ]]; then stem="${file%%-*}"; else stem="${file%-*}"; fi
  name="$(echo "$stem" | tr 'A-Z_.' 'a-z--')"
  mkdir -p "$DIR/simple/$name"
  echo "<a href=\"../../$file\">$file</a><br>" >>"$DIR/simple/$name/index.html"
done
touch "$DIR/.requirements-$key"
echo "wheelhouse: $(find "$DIR" -maxdepth 1 -name '*.whl' -o -maxdepth 1 -name '*.tar.gz' | wc -l) files, $(du -sh "$DIR" | cut -f1), in $((SECONDS - start)) s -> $DIR"
