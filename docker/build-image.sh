#!/bin/sh
# Build the turnout image from the local base image (made first when missing); nothing is pulled.
#
#   docker/build-image.sh [TAG]      (default turnout:latest)
set -eu
tag=${1:-turnout:latest}
here=$(cd "$(dirname "$0")" && pwd)
"$here/build-base.sh"
# pip inside the build trusts what pip here trusts (a network that intercepts TLS needs its CA): $PIP_CERT,
# else the system bundle. The copy stays in the build stage; the final image does not contain it.
cert=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}}
if [ -s "$cert" ]; then
    cp "$cert" "$here/build-context/ca-certificates.crt"
fi
docker build --network host -t "$tag" "$here/.."
