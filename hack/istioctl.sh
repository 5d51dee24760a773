#!/usr/bin/env bash
# Provides istioctl, Istio's CLI, built from its Go module at a pinned version through the Go
# module proxy (no release download), cached under
# ~/.cache/virus-scanner/istioctl/<version>/bin. Its `istioctl kube-inject` runs Istio's own
# sidecar injector offline. Beside bin/, charts/ holds two Helm charts of the same module
# version, so that what kube-inject is fed is what that Istio release installs:
#   istio-discovery  istiod: renders the ConfigMaps `istio-sidecar-injector` (injection
#                    templates and values) and `istio` (mesh config)
#   gateway          Istio's gateway Deployment (the pod template the gateway injection gets)
# Prints the path of the binary; a second run is a cache hit.
set -euo pipefail

# istio.io/istio tags its releases without the `v` Go expects: a pseudo-version of its master.
ISTIO_VERSION=${ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}

. "$(dirname "$0")/go-lib.sh"
dir=$cache_root/istioctl/$ISTIO_VERSION
bin=$dir/bin
if [ -x "$bin/istioctl" ] && [ -s "$dir/charts/gateway/Chart.yaml" ]; then
  echo "$bin/istioctl"
  exit 0
fi
mkdir -p "$bin"

module=$(module_dir "istio.io/istio@$ISTIO_VERSION")
# A directory of this run's own: two runs at once must not mix their copies.
charts=$(mktemp -d "$dir/charts.XXXXXX")
cp -R "$module/manifests/charts/istio-control/istio-discovery" "$module/manifests/charts/gateway" \
  "$charts/"
chmod -R u+w "$charts"

if [ ! -x "$bin/istioctl" ]; then
  go_install "$bin" "istio.io/istio/istioctl/cmd/istioctl@$ISTIO_VERSION"
fi
if [ -s "$dir/charts/gateway/Chart.yaml" ]; then
  rm -rf "$charts"
else
  rm -rf "$dir/charts"
  mv "$charts" "$dir/charts"
fi
echo "$bin/istioctl"
