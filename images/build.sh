#!/usr/bin/env bash
# Build the trainer images (`make image`): the CUDA image, its CPU variant and the Spark image on the CPU one,
# from the repository root.
#   IMAGE=registry.example.com/recsys/trainer:0.1.0 images/build.sh      # -cpu / -spark tag suffixes for the others
#   PUSH=1 images/build.sh                                               # push what was built
#   ONLY=cpu images/build.sh                                             # one of them: cpu | cuda | spark
#   WHEELHOUSE=DIR images/build.sh                  # CPU image from a local wheel folder (images/wheelhouse.sh)
#   OFFLINE=1 images/build.sh                       # CPU, then Spark image, with no registry (tests/test_image_build.py)
#   ONLY=spark images/build.sh                      # the Spark image (-spark tag) on an existing CPU image
#   BASE_IMAGE=REF images/build.sh                  # CPU image on another base than the digest-pinned default
# The Spark image (Dockerfile.spark, tag ${IMAGE}-spark) is the CPU image plus Java 17 from Debian's mirror and
# Spark's Kubernetes entrypoint; it is built FROM the CPU tag, so after it.
# OFFLINE=1 means: the CPU image and then the Spark image (ONLY=cpu or ONLY=spark for one), the classic builder
# (DOCKER_BUILDKIT=0: BuildKit would fetch its Dockerfile frontend from Docker Hub), a stand-in base under the base's tag (images/standin-base.sh; a local image cannot
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
SPARK_IMAGE="${SPARK_IMAGE:-${IMAGE}-spark}"
DOCKER="${DOCKER:-docker}"
ONLY="${ONLY:-}"
WHEELHOUSE="${WHEELHOUSE:-}"
# Fixed, so that the build args (which are part of the layer cache key) stay the same from build to build.
WHEELHOUSE_PORT="${WHEELHOUSE_PORT:-38765}"
BASE_IMAGE="${BASE_IMAGE:-}"
if [[ "${OFFLINE:-0}" == "1" ]]; then
  ONLY="${ONLY:-cpu,spark}"
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
if [[ "${OFFLINE:-0}" == "1" && "$ONLY" != "spark" ]]; then
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

build_spark() {
  echo "building $SPARK_IMAGE (Spark, on $CPU_IMAGE)"
  # Only the Dockerfile and the entrypoint are read; Java comes from the base's Debian mirror.
  tar -c images/trainer/Dockerfile.spark images/trainer/spark-entrypoint.sh |
    "$DOCKER" build --force-rm --build-arg "GIT_SHA=$GIT_SHA" --build-arg "CPU_IMAGE=$CPU_IMAGE" \
      --label org.recsys.image=trainer-spark -f images/trainer/Dockerfile.spark -t "$SPARK_IMAGE" -
}

case "$ONLY" in
  "") build_cuda && build_cpu && build_spark ;;
  cpu) build_cpu ;;
  cuda) build_cuda ;;
  spark) build_spark ;;
  cpu,spark) build_cpu && build_spark ;;
  *)
    echo "make image: ONLY=$ONLY: expected cpu, cuda, spark or cpu,spark" >&2
    exit 2
    ;;
esac
if [[ "${PUSH:-0}" == "1" ]]; then
  [[ "$ONLY" != "" && "$ONLY" != "cuda" ]] || "$DOCKER" push "$IMAGE"
  [[ "$ONLY" != "" && "$ONLY" != cpu* ]] || "$DOCKER" push "$CPU_IMAGE"
  [[ "$ONLY" != "" && "$ONLY" != *spark ]] || "$DOCKER" push "$SPARK_IMAGE"
fi
echo "built ${ONLY:-cuda, cpu and spark} image(s); render jobs for them with: recsys render --set job.image=…"
