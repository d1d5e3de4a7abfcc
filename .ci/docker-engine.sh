#!/usr/bin/env bash
# Makes a Docker engine and a local Python base image available to tests/test_compose.py on a
# CI machine that has Debian's apt mirror but no image registry.
#
#   .ci/docker-engine.sh up     install docker.io + docker-compose (v1) + debootstrap if missing,
#                               start dockerd if no engine answers, build the base image if absent
#   .ci/docker-engine.sh down   stop the dockerd that `up` started (an engine it found is left alone)
#
# The base image stands in for python:3.12-slim (the Dockerfiles' default BASE_IMAGE): Debian
# bookworm minbase + python3/venv (3.11, the same minor as the host, so a host-side torch wheel
# fits) + the host's CA bundle, because this network path re-signs TLS and pip inside an image
# must trust it. It is kept between runs: cold ≈ 1 min, reused ≈ 0 s.
# Idempotent; run as root (apt-get, dockerd). Exit status is non-zero when no engine is usable.
set -euo pipefail
WORK=${WIKIGPT_DOCKER_WORK:-/var/tmp/wikigpt-docker}
BASE_IMAGE=${WIKIGPT_DOCKER_BASE_IMAGE:-local/python:3.11-bookworm}
DOCKER=/usr/bin/docker   # Debian's CLI, same version as the engine (a newer CLI elsewhere on PATH may want buildx)
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$WORK"

log() { echo "[docker-engine] $*" >&2; }
timed() { local s=$SECONDS r=0; "$@" || r=$?; log "$1: $((SECONDS - s)) s (rc=$r)"; return $r; }

install_packages() {
  if [ -x /usr/sbin/dockerd ] && [ -x $DOCKER ] && command -v docker-compose >/dev/null \
     && command -v debootstrap >/dev/null; then
    return 0
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io docker-compose debootstrap >"$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log" >&2; return 1; }
}

start_engine() {
  $DOCKER info >/dev/null 2>&1 && { log "engine already answers; using it"; return 0; }
  nohup /usr/sbin/dockerd >"$WORK/dockerd.log" 2>&1 &
  echo $! >"$WORK/dockerd.pid"
  for _ in $(seq 120); do   # 60 s
    $DOCKER info >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$WORK/dockerd.pid")" 2>/dev/null || break
    sleep 0.5
  done
  tail -30 "$WORK/dockerd.log" >&2
  return 1
}

build_base_image() {
  $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1 && { log "reusing $BASE_IMAGE"; return 0; }
  local mirror rootfs="$WORK/rootfs"
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || { log "no Debian mirror in the host's apt sources"; return 1; }
  rm -rf "$rootfs"
  # --include pulls python3 into the rootfs directly: one import, no build step with apt in it.
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host-ca.crt"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  local ca=/etc/ssl/certs/ca-certificates.crt
  tar -C "$rootfs" -c . | $DOCKER import \
    -c "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 SSL_CERT_FILE=$ca REQUESTS_CA_BUNDLE=$ca PIP_CERT=$ca" \
    -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "built $BASE_IMAGE ($($DOCKER image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
}

stop_engine() {
  local pidfile="$WORK/dockerd.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  # only the dockerd we started (a stale pid file may name a reused pid by now)
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
    kill "$pid"   # dockerd stops its containers and its own containerd
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$pidfile"
}

case "${1:-up}" in
  up)
    timed install_packages
    timed start_engine
    timed build_base_image
    log "engine $($DOCKER version -f '{{.Server.Version}}'), $(docker-compose version --short), base $BASE_IMAGE"
    ;;
  down) stop_engine ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
