#!/bin/sh
# Build the local base image the Dockerfile starts from (nothing is pulled from a registry):
# a minimal Debian bookworm root made by debootstrap, imported as turnout-base:bookworm.
#
#   docker/build-base.sh [IMAGE] [CACHE_TARBALL]
#
# The root file system is cached as a tarball (default ~/.cache/turnout/bookworm-minbase.tar) so a new
# Docker engine (a test session's private one, say) imports it in seconds instead of bootstrapping again.
set -eu
image=${1:-turnout-base:bookworm}
cache=${2:-${XDG_CACHE_HOME:-$HOME/.cache}/turnout/bookworm-minbase.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image already present"
    exit 0
fi
if [ ! -s "$cache" ]; then
    mkdir -p "$(dirname "$cache")"
    root=$(mktemp -d "${TMPDIR:-/tmp}/turnout-base.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
    # Keep apt lean inside the image: no recommends, no caches left in layers.
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/90turnout"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar --numeric-owner -C "$root" -cf "$cache.tmp" .
    mv "$cache.tmp" "$cache"
fi
docker import --change 'CMD ["/bin/bash"]' - "$image" <"$cache" >/dev/null
echo "$image imported from $cache"
