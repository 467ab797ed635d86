#!/usr/bin/env bash
# Build the trainer images (`make image`): the CUDA image and its CPU variant, from the repository root.
#   IMAGE=registry.example.com/recsys/trainer:0.1.0 images/build.sh      # CPU variant gets the -cpu tag suffix
#   PUSH=1 images/build.sh                                               # push both after building
# Without a Docker engine it says so and exits 3 (the Dockerfiles are still linted by tests/test_images.py).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-ghcr.io/recsys/trainer:0.1.0}"
CPU_IMAGE="${CPU_IMAGE:-${IMAGE}-cpu}"
DOCKER="${DOCKER:-docker}"

if ! command -v "$DOCKER" >/dev/null 2>&1; then
  echo "make image: no '$DOCKER' command on PATH; install Docker (or set DOCKER=podman) to build images" >&2
  exit 3
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "make image: no Docker engine answers ('$DOCKER info' failed): the $DOCKER client is here but no daemon;" >&2
  echo "            start one (or point DOCKER_HOST at one) to build $IMAGE and $CPU_IMAGE" >&2
  exit 3
fi

echo "building $IMAGE (CUDA) and $CPU_IMAGE (CPU)"
DOCKER_BUILDKIT=1 "$DOCKER" build -f images/trainer/Dockerfile -t "$IMAGE" .
DOCKER_BUILDKIT=1 "$DOCKER" build -f images/trainer/Dockerfile.cpu -t "$CPU_IMAGE" .
if [[ "${PUSH:-0}" == "1" ]]; then
  "$DOCKER" push "$IMAGE"
  "$DOCKER" push "$CPU_IMAGE"
fi
echo "built $IMAGE and $CPU_IMAGE; render jobs for them with: recsys render --set job.image=$IMAGE …"
