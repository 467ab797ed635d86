#!/usr/bin/env bash
# Build a local stand-in for the CPU trainer image's base (the BASE_IMAGE default of images/trainer/Dockerfile.cpu,
# python:3.11-slim-bookworm@sha256:…) when no registry can be reached: Debian bookworm from the Debian mirror
# (debootstrap, minbase) with Debian's Python 3.11 and venv, imported into the engine under the base's tag.
# A local image cannot carry the registry's digest (the digest is the hash of the registry's manifest), so the
# stand-in has the tag only and the offline build passes it: `--build-arg BASE_IMAGE=python:3.11-slim-bookworm`.
#   images/standin-base.sh              # kept when that tag already exists
#   FORCE=1 images/standin-base.sh      # rebuild even if the tag exists
#   DEBIAN_MIRROR=http://mirror.example/debian images/standin-base.sh
# Needs root, debootstrap (installed with apt-get when absent) and a Docker engine (images/engine.sh starts one).
# Exit 3 with one line when one of those is missing and cannot be had.
#
# What the Dockerfile relies on from its base, and how the stand-in provides it:
#   `python` / `python3` on PATH, CPython 3.11  -> Debian's python3.11, linked into /usr/local/bin like the
#                                                 official image's own build
#   `python -m venv` with pip (ensurepip)       -> python3-venv
#   bash, useradd, glibc 2.36 (bookworm)        -> Debian minbase (the same release the official image uses)
#   TLS to PyPI                                 -> ca-certificates plus this machine's local CAs
#                                                 (/usr/local/share/ca-certificates/*.crt), needed where
#                                                 traffic goes through an intercepting proxy
# Differences that remain: the patch release of Python (Debian 3.11.2 vs the official image's latest 3.11.x)
# and no system-wide pip; the Dockerfile uses neither.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER="${DOCKER:-docker}"
SUITE="${SUITE:-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The Dockerfile's digest-pinned default without its digest: name:tag.
BASE="${1:-$(sed -n 's/^ARG BASE_IMAGE=\([^@[:space:]]*\).*/\1/p' images/trainer/Dockerfile.cpu | head -n 1)}"

missing() {
  echo "standin-base: $*" >&2
  exit 3
}
[[ -n "$BASE" ]] || missing "no ARG BASE_IMAGE=… line found in images/trainer/Dockerfile.cpu"
"$DOCKER" info >/dev/null 2>&1 || missing "no Docker engine answers ('$DOCKER info' failed; images/engine.sh starts one)"

if [[ "${FORCE:-0}" != "1" ]] && "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  # A real pulled base or an earlier stand-in: either is what the build needs, and rebuilding costs a minute.
  echo "standin-base: $BASE exists, kept (FORCE=1 rebuilds it)"
  exit 0
fi
[[ "$(id -u)" == "0" ]] || missing "debootstrap needs root (run as root, or pull $BASE from a registry)"
if ! command -v debootstrap >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || missing "no debootstrap and no apt-get to install it"
  echo "standin-base: installing debootstrap with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

ROOTFS="$(mktemp -d /var/tmp/recsys-standin.XXXXXX)"
cleanup() {
  # debootstrap mounts /proc and /sys inside the tree while it runs; a failed run can leave them mounted,
  # and rm must never descend into them.
  for m in $(findmnt -rn -o TARGET | grep -F "$ROOTFS" | sort -r || true); do umount -l "$m" || true; done
  rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

echo "standin-base: debootstrap $SUITE (minbase + python3, python3-venv) from $DEBIAN_MIRROR into $ROOTFS"
start=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" >"$ROOTFS.log" 2>&1 || {
  tail -n 20 "$ROOTFS.log" >&2
  rm -f "$ROOTFS.log"
  echo "standin-base: debootstrap failed (log above)" >&2
  exit 1
}
rm -f "$ROOTFS.log"

shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
if ((${#local_cas[@]})); then
  cp "${local_cas[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
fi
# (its `openssl rehash` warns about the bundle file itself; only a failure matters)
chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || { echo "standin-base: update-ca-certificates failed in the stand-in" >&2; exit 1; }

# The official image installs its Python under /usr/local/bin; the Dockerfile calls `python`.
for name in python python3 python3.11; do
  ln -sf /usr/bin/python3.11 "$ROOTFS/usr/local/bin/$name"
done
# What the official slim image also leaves out: package lists and downloaded .debs.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb

tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL org.recsys.standin=debootstrap' \
  --change 'CMD ["python3"]' \
  - "$BASE" >/dev/null
echo "standin-base: built $BASE in $((SECONDS - start)) s ($("$DOCKER" run --rm "$BASE" python --version 2>&1), ${#local_cas[@]} local CA(s))"
