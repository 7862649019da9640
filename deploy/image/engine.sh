#!/usr/bin/env bash
# Make a Docker engine answer on this machine: install Debian's docker.io (and debootstrap, which
# base.sh needs) when missing, then start dockerd as root when nothing answers yet.
#
# vfs is the storage driver that works inside this project's sandboxed VMs (no overlayfs on
# overlayfs); it copies each layer whole, so keep images to few layers. Set
# QDSERVE_DOCKERD_IPTABLES=false where the default bridge cannot be set up (no iptables/nftables).
# Idempotent: an engine that already answers is left alone, whoever started it.
set -euo pipefail

log=${QDSERVE_DOCKERD_LOG:-/var/log/qdserve-dockerd.log}

if docker info >/dev/null 2>&1; then
  echo "engine: dockerd already answers ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "engine: no Docker engine answers and starting one needs root" >&2
  exit 1
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "engine: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

start() {
  echo "engine: starting dockerd --storage-driver=vfs $* (log: $log)"
  # setsid: the daemon outlives this script and the CI step that ran it.
  setsid dockerd --storage-driver=vfs "$@" >>"$log" 2>&1 </dev/null &
  for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
      echo "engine: up ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))"
      return 0
    fi
    if ! kill -0 $! 2>/dev/null; then
      return 1
    fi
    sleep 1
  done
  return 1
}

if [ "${QDSERVE_DOCKERD_IPTABLES:-true}" = false ]; then
  start --iptables=false --ip-masq=false
elif ! start; then
  # The default bridge needs iptables; without it dockerd exits at start-up. Host networking
  # and user-defined networks still work without it.
  echo "engine: dockerd failed to start with iptables; retrying with --iptables=false" >&2
  tail -n 5 "$log" >&2 || true
  start --iptables=false --ip-masq=false
fi
