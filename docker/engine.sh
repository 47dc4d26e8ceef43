#!/usr/bin/env bash
# A Docker Engine for `make images`, `make run-pipeline RUNNER=docker` and the container tests.
#   docker/engine.sh start   prints the DOCKER_HOST to use; starts dockerd when none answers (installing
#                            Debian's docker.io + runc when missing). Exit 0, and "started" on stderr
#                            when this call started the daemon.
#   docker/engine.sh stop    stops the dockerd this script started (by its pid file).
# The daemon keeps its images and layer cache under $SLICEFM_DOCKER_DIR (default /var/lib/slicefm-docker as
# root, ~/.cache/slicefm-docker otherwise), so later builds reuse them. It runs without a bridge network
# (--bridge=none): containers get no network unless a command asks for the host's (loopback only here).
set -euo pipefail

DIR=${SLICEFM_DOCKER_DIR:-$([ "$(id -u)" = 0 ] && echo /var/lib/slicefm-docker || echo "$HOME/.cache/slicefm-docker")}
SOCK="unix://$DIR/docker.sock"
PIDFILE="$DIR/dockerd.pid"

answers() { DOCKER_HOST="$1" timeout 20 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
  if [ -n "${DOCKER_HOST:-}" ] && answers "$DOCKER_HOST"; then echo "$DOCKER_HOST"; return; fi
  for host in "$SOCK" unix:///var/run/docker.sock; do
    if answers "$host"; then echo "$host"; return; fi
  done
  if ! command -v dockerd >/dev/null || ! command -v runc >/dev/null || ! command -v docker >/dev/null; then
    echo "installing docker.io and runc (Debian packages)" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io runc >&2
  fi
  mkdir -p "$DIR"
  # crun fails on some cgroup layouts: runc is the default runtime here.
  setsid nohup dockerd --host "$SOCK" --data-root "$DIR/root" --exec-root "$DIR/exec" --pidfile "$PIDFILE" \
    --bridge=none --iptables=false --ip-masq=false >"$DIR/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 1 120); do
    if answers "$SOCK"; then echo "started dockerd ($DIR, log dockerd.log)" >&2; echo "$SOCK"; return; fi
    sleep 0.5
  done
  echo "dockerd did not answer on $SOCK within 60 s; see $DIR/dockerd.log" >&2
  tail -5 "$DIR/dockerd.log" >&2 || true
  exit 1
}

stop() {
  [ -f "$PIDFILE" ] || { echo "no dockerd started by this script ($PIDFILE missing)" >&2; return; }
  pid=$(cat "$PIDFILE")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { echo "stopped dockerd $pid" >&2; return; }; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
