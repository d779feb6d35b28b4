#!/bin/sh
# Build the turnout image from the local base image (made first when missing); nothing is pulled.
#
#   docker/build-image.sh [TAG]      (default turnout:latest)
set -eu
tag=${1:-turnout:latest}
here=$(cd "$(dirname "$0")" && pwd)
"$here/build-base.sh"
# pip inside the build trusts the same CA bundle as pip here (networks that intercept TLS need it).
if [ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ]; then
    cp "$PIP_CERT" "$here/build-context/ca-certificates.crt"
fi
docker build --network host -t "$tag" "$here/.."
