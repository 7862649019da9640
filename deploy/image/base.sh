#!/usr/bin/env bash
# Debian bookworm base image built from Debian's own packages, for machines that reach no image
# registry (nothing can be pulled, so every FROM must already be local).
#
#   deploy/image/base.sh [TAG]     default TAG: qdserve-base:bookworm
#
# debootstrap --variant=minbase (essential + apt, about 40 s) into a temporary directory, apt
# sources for the point release, updates and security, apt lists and caches dropped, then
# `docker import`. Does nothing when TAG already exists (delete it to rebuild). Needs root.
set -euo pipefail

tag=${1:-qdserve-base:bookworm}
suite=bookworm
mirror=${QDSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${QDSERVE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base: $tag exists"
  exit 0
fi
command -v debootstrap >/dev/null || {
  echo "base: debootstrap is missing (apt-get install debootstrap)" >&2
  exit 1
}

root=$(mktemp -d /var/tmp/qdserve-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
chmod 755 "$root" # mktemp makes it 0700: it becomes the image's /, which every user must traverse
echo "base: debootstrap --variant=minbase $suite $mirror (about 40 s)"
start=$SECONDS
# Progress: one line per package stage, not debootstrap's per-file noise.
debootstrap --variant=minbase "$suite" "$root" "$mirror" 2>&1 |
  grep --line-buffered -E '^I: (Retrieving (In)?Release|Validating Packages|Extracting base|Installing core|Configuring (apt|base-files|libc6))|^W:|^E:' || true
[ -x "$root/usr/bin/apt-get" ] || {
  echo "base: debootstrap failed (no apt-get in $root)" >&2
  exit 1
}

cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
SOURCES
# An image needs no man pages, docs or locales beyond C.UTF-8; keep apt from adding them later.
cat >"$root/etc/dpkg/dpkg.cfg.d/01-qdserve-nodoc" <<'NODOC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
NODOC
cat >"$root/etc/apt/apt.conf.d/01-qdserve-slim" <<'SLIM'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
SLIM
find "$root/var/lib/apt/lists" -type f -delete
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log

echo "base: docker import -> $tag"
tar --numeric-owner --xattrs -C "$root" -c . |
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $suite $mirror" \
    - "$tag" >/dev/null
echo "base: $tag built in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
