#!/usr/bin/env bash
# `make images`: build the slicefm image on a machine that reaches no container registry (air-gapped
# clusters build it the same way). Steps, each skipped when its result is already there:
#   1. a Docker Engine answers (docker/engine.sh: installs docker.io/runc, starts dockerd);
#   2. the base: python:3.11-slim-bookworm when it is present or can be pulled, else a local Debian 12
#      (Python 3.11) base made with debootstrap and `docker import`;
#   3. the wheelhouse: every pin of requirements.lock as a wheel (pip wheel; sdists built once);
#   4. the dependency image slicefm-deps:<hash of lock, Dockerfile.deps and base>, packages served to the
#      build over loopback (never in the build context or a layer);
#   5. the slicefm wheel, built here (docker/dist/): its C resize kernel needs a compiler the images lack;
#   6. the project image: that wheel on top, tagged <name>:<version> and <name>:<version>-<commit>.
# Environment: IMAGE_NAME (slicefm), IMAGE_REGISTRY (prefix, optional), VERSION, GIT_COMMIT, TAG,
# PYTHON_BASE, WHEELHOUSE, SLICEFM_DOCKER_DIR, PYTHON (the host python that runs pip), DOCKER_HOST.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
TAG=${TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo dev)}
PREFIX=${IMAGE_REGISTRY:+$IMAGE_REGISTRY/}
IMAGE=${PREFIX}${IMAGE_NAME:-slicefm}
PYTHON_BASE=${PYTHON_BASE:-python:3.11-slim-bookworm}
DOCKER_DIR=${SLICEFM_DOCKER_DIR:-$([ "$(id -u)" = 0 ] && echo /var/lib/slicefm-docker || echo "$HOME/.cache/slicefm-docker")}
WHEELHOUSE=${WHEELHOUSE:-$DOCKER_DIR/wheelhouse}
export SLICEFM_DOCKER_DIR=$DOCKER_DIR

step() { echo "== $* ($(date +%T))"; }

step "docker engine"
DOCKER_HOST=$(docker/engine.sh start)
export DOCKER_HOST
has_image() { docker image inspect "$1" >/dev/null 2>&1; }

step "base image"
base=$PYTHON_BASE
if ! has_image "$base" && ! timeout 60 docker pull -q "$base" >/dev/null 2>&1; then
  base=slicefm-base:bookworm
  if ! has_image "$base"; then
    echo "$PYTHON_BASE cannot be pulled: building $base with debootstrap (Debian 12, Python 3.11)"
    command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
    rootfs=$(mktemp -d "$DOCKER_DIR/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/*
    tar -C "$rootfs" -c . | docker import -c 'CMD ["python3"]' - "$base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
  fi
fi
echo "base: $base"

step "wheelhouse ($WHEELHOUSE)"
mkdir -p "$WHEELHOUSE"
lock_hash=$(cat requirements.lock docker/Dockerfile.deps <(docker image inspect -f '{{.Id}}' "$base") | sha256sum | cut -c1-12)
deps=slicefm-deps:$lock_hash
if ! has_image "$deps"; then
  if [ ! -f "$WHEELHOUSE/.lock-$lock_hash" ]; then
    "$PYTHON" -m pip wheel --quiet --no-deps -r requirements.lock -w "$WHEELHOUSE" 2> >(grep -v "^WARNING: Location" >&2)
    touch "$WHEELHOUSE/.lock-$lock_hash"
  fi
  step "dependency image $deps"
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$port" >/dev/null 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  context=$(mktemp -d)
  cp requirements.lock "$context/"
  docker build --network host -q -f docker/Dockerfile.deps --build-arg "BASE_IMAGE=$base" \
    --build-arg "WHEELS_URL=http://127.0.0.1:$port/" -t "$deps" "$context" >/dev/null
  rm -rf "$context"
  kill "$server" 2>/dev/null || true
  trap - EXIT
else
  echo "$deps present: wheelhouse not needed"
fi

step "slicefm wheel (docker/dist)"
# Built by the host python, like the wheelhouse (same Python 3.11 ABI and Debian 12 glibc as the image). A
# host without a C compiler gives a wheel without the kernel: the image then resizes with Pillow (same bytes).
rm -rf docker/dist/*.whl
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w docker/dist . 2> >(grep -v "^WARNING: Location" >&2)

step "project image $IMAGE:$VERSION"
docker build -q -f docker/Dockerfile --build-arg "DEPS_IMAGE=$deps" --build-arg "VERSION=$VERSION" \
  --build-arg "GIT_COMMIT=$GIT_COMMIT" --build-arg "IMAGE=$IMAGE:$VERSION-$TAG" \
  -t "$IMAGE:$VERSION" -t "$IMAGE:$VERSION-$TAG" . >/dev/null
# Older dependency images no tagged image uses any more (7 GB each) and dangling layers go.
for old in $(docker images slicefm-deps --format '{{.Repository}}:{{.Tag}}' | grep -vx "$deps"); do
  docker rmi "$old" >/dev/null 2>&1 || true
done
docker image prune -f >/dev/null
step "done"
for ref in "$IMAGE:$VERSION" "$IMAGE:$VERSION-$TAG"; do
  docker image inspect -f "{{index .RepoTags 0}} {{.Size}}" "$ref" | awk -v r="$ref" '{printf "%s  %.2f GB\n", r, $2 / 1e9}'
done
echo "DOCKER_HOST=$DOCKER_HOST"
