#!/usr/bin/env bash
# Provides the CRDs of the gateways a VirusScanPolicy writes to, at pinned versions, from their
# Go modules through the Go module proxy (no release downloads), cached under
# ~/.cache/virus-scanner/gateway-crds/<eg>-<istio>/:
#   envoy-gateway.yaml  Gateway API (as Envoy Gateway ships it) and Envoy Gateway's
#                       EnvoyExtensionPolicy, Backend and ClientTrafficPolicy
#                       (module github.com/envoyproxy/gateway)
#   istio.yaml          Istio's CRDs, EnvoyFilter among them (module istio.io/api)
# Prints the directory. A second run is a cache hit.
set -euo pipefail

ENVOY_GATEWAY_VERSION=${ENVOY_GATEWAY_VERSION:-v1.9.1}
ISTIO_API_VERSION=${ISTIO_API_VERSION:-v1.32.0}

. "$(dirname "$0")/go-lib.sh"
dir=$cache_root/gateway-crds/$ENVOY_GATEWAY_VERSION-$ISTIO_API_VERSION
if [ -s "$dir/envoy-gateway.yaml" ] && [ -s "$dir/istio.yaml" ]; then
  echo "$dir"
  exit 0
fi
mkdir -p "$dir"

eg=$(module_dir "github.com/envoyproxy/gateway@$ENVOY_GATEWAY_VERSION")
crds=$eg/charts/gateway-helm/charts/crds/crds
{
  cat "$crds/gatewayapi-crds.yaml"
  for kind in envoyextensionpolicies backends clienttrafficpolicies; do
    printf '\n---\n'
    cat "$crds/generated/gateway.envoyproxy.io_$kind.yaml"
  done
} > "$dir/envoy-gateway.yaml.tmp"
mv "$dir/envoy-gateway.yaml.tmp" "$dir/envoy-gateway.yaml"

istio=$(module_dir "istio.io/api@$ISTIO_API_VERSION")
cp "$istio/kubernetes/customresourcedefinitions.gen.yaml" "$dir/istio.yaml.tmp"
chmod u+w "$dir/istio.yaml.tmp"
mv "$dir/istio.yaml.tmp" "$dir/istio.yaml"
echo "$dir"
