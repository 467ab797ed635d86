#!/usr/bin/env bash
# Make sure a Docker engine answers, installing and starting one where that can work:
#   images/engine.sh
# Nothing to do when `docker info` already answers. Otherwise, as root with apt-get: install Debian's docker.io
# when there is no dockerd, start dockerd in the background (log: $DOCKERD_LOG, default
# /var/log/recsys-dockerd.log; its pid is in /var/run/docker.pid) and wait until `docker info` answers.
# Exit 0: an engine answers. Exit 3, with one line saying what is missing: it cannot work here (not root, no
# apt-get). Exit 1: it should have worked and did not (the log's tail is printed).
set -euo pipefail

DOCKER="${DOCKER:-docker}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/recsys-dockerd.log}"

if "$DOCKER" info >/dev/null 2>&1; then
  echo "engine: a Docker engine answers"
  exit 0
fi
if [[ "$(id -u)" != "0" ]]; then
  echo "engine: no Docker engine answers and not root, so none can be installed or started here" >&2
  exit 3
fi
if ! command -v dockerd >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || {
    echo "engine: no Docker engine answers, no dockerd, and no apt-get to install docker.io" >&2
    exit 3
  }
  echo "engine: installing docker.io with apt-get"
  # The package lists may be missing or stale on a fresh machine; docker.io pulls containerd and runc.
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
# dockerd writes its pid to /var/run/docker.pid; a live one is only slow to answer.
if ! { [[ -s /var/run/docker.pid ]] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; }; then
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  # A new session so that it outlives this script and the caller's terminal; no stdio tied to the caller
  # (a test runner or CI reading our output would otherwise wait for dockerd to exit).
  setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  echo "engine: started dockerd (pid $!, log $DOCKERD_LOG)"
fi
for _ in $(seq 1 120); do
  if "$DOCKER" info >/dev/null 2>&1; then
    echo "engine: a Docker engine answers ($("$DOCKER" version --format '{{.Server.Version}}'))"
    exit 0
  fi
  sleep 0.5
done
echo "engine: dockerd did not answer within 60 s; the end of $DOCKERD_LOG:" >&2
tail -n 20 "$DOCKERD_LOG" >&2 || true
exit 1
