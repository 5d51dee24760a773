#!/usr/bin/env bash
# Provides egctl, Envoy Gateway's CLI, built from its Go module at a pinned version through the
# Go module proxy (no release download), cached under
# ~/.cache/virus-scanner/egctl/<version>/bin. Its `egctl x translate` turns Gateway API and
# Envoy Gateway objects into the Envoy configuration Envoy Gateway would serve. Prints the
# path of the binary; a second run is a cache hit.
set -euo pipefail

ENVOY_GATEWAY_VERSION=${ENVOY_GATEWAY_VERSION:-v1.9.1}

. "$(dirname "$0")/go-lib.sh"
bin=$cache_root/egctl/$ENVOY_GATEWAY_VERSION/bin
if [ -x "$bin/egctl" ]; then
  echo "$bin/egctl"
  exit 0
fi
mkdir -p "$bin"
go_install "$bin" "github.com/envoyproxy/gateway/cmd/egctl@$ENVOY_GATEWAY_VERSION"
echo "$bin/egctl"
