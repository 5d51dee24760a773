#!/usr/bin/env bash
# Provides egctl, Envoy Gateway's CLI, built from its Go module at a pinned version through the
# Go module proxy (no release download), cached under
# ~/.cache/virus-scanner/egctl/<version>/bin. Its `egctl x translate` turns Gateway API and
# Envoy Gateway objects into the Envoy configuration Envoy Gateway would serve. Prints the
# path of the binary; a second run is a cache hit.
set -euo pipefail

ENVOY_GATEWAY_VERSION=${ENVOY_GATEWAY_VERSION:-v1.9.1}

bin=${VIRUS_SCANNER_CACHE:-$HOME/.cache/virus-scanner}/egctl/$ENVOY_GATEWAY_VERSION/bin
if [ -x "$bin/egctl" ]; then
  echo "$bin/egctl"
  exit 0
fi
mkdir -p "$bin"
export PATH=$PATH:/usr/local/go/bin
export GOFLAGS=-mod=mod
export GOPATH=${GOPATH:-$HOME/go}
echo "building egctl $ENVOY_GATEWAY_VERSION (into $bin)" >&2
# Its build cache runs to gigabytes and serves nothing else: kept apart and removed after.
GOCACHE=$(mktemp -d)
export GOCACHE
trap 'rm -rf "$GOCACHE"' EXIT
GOBIN=$bin go install -trimpath -ldflags="-s -w" \
  "github.com/envoyproxy/gateway/cmd/egctl@$ENVOY_GATEWAY_VERSION" >&2
echo "$bin/egctl"
