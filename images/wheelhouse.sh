#!/usr/bin/env bash
# Collect every wheel the CPU trainer image installs (requirements/cpu.txt + requirements/torchrec.txt) into a
# folder with this machine's pip, and index it (PEP 503) so that a build can install from it alone:
#   images/wheelhouse.sh [DIR]             # default ~/.cache/recsys/wheelhouse (outside the repository, so
#                                          # that fresh clones on the same machine, like CI's, reuse it)
#   WHEELHOUSE=DIR images/build.sh         # serves DIR on 127.0.0.1 to the build (see build.sh)
# Why: where the PyTorch CPU index cannot be reached, pip inside the build would fetch PyPI's torch (the CUDA
# build, ~3 GB with its nvidia-* wheels) for every cold build; this machine's pip already has those wheels in
# its cache or local indexes, so collecting them here is a copy, and the build then needs no network at all.
# Skipped when DIR was collected from the same requirement files (FORCE=1 collects again).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${1:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/recsys/wheelhouse}"
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
REQS=(requirements/cpu.txt requirements/torchrec.txt)
key="$(cat "${REQS[@]}" | sha256sum | cut -c1-16)"

if [[ "${FORCE:-0}" != "1" && -f "$DIR/.requirements-$key" ]]; then
  echo "wheelhouse: $DIR is up to date ($(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l) wheels)"
  exit 0
fi
rm -rf "$DIR"
mkdir -p "$DIR"
start=$SECONDS
# pip wheel, not pip download: a package published only as an sdist is built here once, so the image
# build never needs a compiler or build dependencies.
# (The grep drops pip's warnings about local index folders that lack a project: noise, not a problem.)
"$PY" -m pip wheel -q -w "$DIR" -r requirements/cpu.txt 2> >(grep -v "is ignored: it is neither" >&2)
# torchrec's metadata requires the CUDA fbgemm-gpu; the image installs it with --no-deps too.
"$PY" -m pip wheel -q --no-deps -w "$DIR" -r requirements/torchrec.txt 2> >(grep -v "is ignored: it is neither" >&2)

# A PEP 503 "simple" index over the flat folder: simple/<normalized name>/index.html -> ../../<wheel>.
for whl in "$DIR"/*.whl; do
  file="$(basename "$whl")"
  name="$(echo "${file%%-*}" | tr 'A-Z_.' 'a-z--')"
  mkdir -p "$DIR/simple/$name"
  echo "<a href=\"../../$file\">$file</a><br>" >>"$DIR/simple/$name/index.html"
done
touch "$DIR/.requirements-$key"
echo "wheelhouse: $(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1), in $((SECONDS - start)) s -> $DIR"
