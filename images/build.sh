#!/usr/bin/env bash
# Build the trainer images (`make image`): the CUDA image and its CPU variant, from the repository root.
#   IMAGE=registry.example.com/recsys/trainer:0.1.0 images/build.sh      # CPU variant gets the -cpu tag suffix
#   PUSH=1 images/build.sh                                               # push both after building
#   ONLY=cpu images/build.sh                                             # one of them: cpu | cuda
#   WHEELHOUSE=DIR images/build.sh                  # CPU image from a local wheel folder (images/wheelhouse.sh)
#   OFFLINE=1 images/build.sh                       # CPU image with no registry at all, as tests/test_image_build.py does
#   BASE_IMAGE=REF images/build.sh                  # CPU image on another base than the digest-pinned default
# OFFLINE=1 means: ONLY=cpu, the classic builder (DOCKER_BUILDKIT=0: BuildKit would fetch its Dockerfile
# frontend from Docker Hub), a stand-in base under the base's tag (images/standin-base.sh; a local image cannot
# have the registry's digest, so BASE_IMAGE is that tag), and the locked files collected by this machine's pip
# (images/wheelhouse.sh). The Dockerfiles are the ones a user builds;
# only build args change where pip takes packages from.
# Without a Docker engine it says so and exits 3 (images/engine.sh starts one; tests/test_images.py lints the
# Dockerfiles either way).
set -euo pipefail
# The revision the image is built from (RECSYS_GIT_SHA in the image; "unknown" outside a checkout).
GIT_SHA="${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-ghcr.io/recsys/trainer:0.1.0}"
CPU_IMAGE="${CPU_IMAGE:-${IMAGE}-cpu}"
DOCKER="${DOCKER:-docker}"
ONLY="${ONLY:-}"
WHEELHOUSE="${WHEELHOUSE:-}"
# Fixed, so that the build args (which are part of the layer cache key) stay the same from build to build.
WHEELHOUSE_PORT="${WHEELHOUSE_PORT:-38765}"
BASE_IMAGE="${BASE_IMAGE:-}"
if [[ "${OFFLINE:-0}" == "1" ]]; then
  ONLY=cpu
  # The stand-in's tag: the Dockerfile's digest-pinned default without its @sha256:… part.
  BASE_IMAGE="${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=\([^@[:space:]]*\).*/\1/p' images/trainer/Dockerfile.cpu | head -n 1)}"
  WHEELHOUSE="${WHEELHOUSE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/recsys/wheelhouse}"
  export DOCKER_BUILDKIT=0
fi

if ! command -v "$DOCKER" >/dev/null 2>&1; then
  echo "make image: no '$DOCKER' command on PATH; install Docker (or set DOCKER=podman) to build images" >&2
  exit 3
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "make image: no Docker engine answers ('$DOCKER info' failed): the $DOCKER client is here but no daemon;" >&2
  echo "            start one (images/engine.sh, or point DOCKER_HOST at one) to build $IMAGE and $CPU_IMAGE" >&2
  exit 3
fi
if [[ "${OFFLINE:-0}" == "1" ]]; then
  bash images/standin-base.sh "$BASE_IMAGE"
  bash images/wheelhouse.sh "$WHEELHOUSE"
fi

# The build context, sent as a tar stream: only what the Dockerfiles COPY. The classic builder ignores the
# per-Dockerfile .dockerignore files (BuildKit only), and the repository root holds .venv and data (GBs).
context() {
  tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    requirements pyproject.toml recsys images/trainer
}

server_pid=""
stop_server() { if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi; }
trap stop_server EXIT
# Serve the wheel folder's PEP 503 index on the loopback to a build on the host network: the classic builder
# has no bind mounts, and COPYing GBs of wheels into the image would keep them in a layer.
serve_wheelhouse() {
  local port="$1"
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$WHEELHOUSE" >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 1 50); do
    if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/simple/torch/', timeout=1)" 2>/dev/null; then
      return 0
    fi
    kill -0 "$server_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

build_cpu() {
  local args=()
  [[ -z "$BASE_IMAGE" ]] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  if [[ -n "$WHEELHOUSE" ]]; then
    [[ -d "$WHEELHOUSE/simple" ]] || {
      echo "make image: $WHEELHOUSE has no simple/ index; collect it with images/wheelhouse.sh $WHEELHOUSE" >&2
      exit 1
    }
    if ! serve_wheelhouse "$WHEELHOUSE_PORT"; then
      stop_server
      # Taken port: any free one works, at the price of a cold pip layer (the URL is in the cache key).
      WHEELHOUSE_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
      echo "make image: port taken, serving $WHEELHOUSE on $WHEELHOUSE_PORT instead (the pip layer is rebuilt)"
      serve_wheelhouse "$WHEELHOUSE_PORT" || {
        echo "make image: cannot serve $WHEELHOUSE on 127.0.0.1" >&2
        exit 1
      }
    fi
    local index="http://127.0.0.1:$WHEELHOUSE_PORT/simple"
    args+=(--network host --build-arg "PIP_INDEX_URL=$index")
    echo "building $CPU_IMAGE (CPU) from the wheels in $WHEELHOUSE"
  else
    echo "building $CPU_IMAGE (CPU)"
  fi
  context | "$DOCKER" build --force-rm --build-arg "GIT_SHA=$GIT_SHA" --label org.recsys.image=trainer-cpu "${args[@]}" \
    -f images/trainer/Dockerfile.cpu -t "$CPU_IMAGE" -
  stop_server
}

build_cuda() {
  echo "building $IMAGE (CUDA)"
  context | "$DOCKER" build --force-rm --build-arg "GIT_SHA=$GIT_SHA" --label org.recsys.image=trainer-cuda \
    -f images/trainer/Dockerfile -t "$IMAGE" -
}

case "$ONLY" in
  "") build_cuda && build_cpu ;;
  cpu) build_cpu ;;
  cuda) build_cuda ;;
  *)
    echo "make image: ONLY=$ONLY: expected cpu or cuda" >&2
    exit 2
    ;;
esac
if [[ "${PUSH:-0}" == "1" ]]; then
  [[ "$ONLY" == "cpu" ]] || "$DOCKER" push "$IMAGE"
  [[ "$ONLY" == "cuda" ]] || "$DOCKER" push "$CPU_IMAGE"
fi
echo "built ${ONLY:-cuda and cpu} image(s); render jobs for them with: recsys render --set job.image=…"
