#!/usr/bin/env bash
# Provides pinned Kubernetes test binaries, built from Go modules through the Go module proxy
# (no release downloads), cached under ~/.cache/virus-scanner/k8s/<version>/bin:
#   kube-apiserver, kubectl, kube-controller-manager  (wrapper module around k8s.io/kubernetes)
#   helm, kubeconform                                  (go install)
#   etcd                                               (crates.io etcd-bin-vendored)
# Prints the bin directory. A second run with everything present is a cache hit.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.36.3}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.7.0}
ETCD_CRATE_VERSION=${ETCD_CRATE_VERSION:-3.7.2}

# The directory name carries a recipe number: a change to how binaries are built rebuilds.
cache=${VIRUS_SCANNER_CACHE:-$HOME/.cache/virus-scanner}/k8s/$K8S_VERSION-r2
bin=$cache/bin
mkdir -p "$bin"
export GOFLAGS=-mod=mod
export GOPATH=${GOPATH:-$HOME/go}

need=()
for b in kube-apiserver kubectl kube-controller-manager helm kubeconform etcd; do
  [ -x "$bin/$b" ] || need+=("$b")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "$bin"
  exit 0
fi
echo "building: ${need[*]} (into $bin)" >&2

staging_minor="0.${K8S_VERSION#*.}"   # 1.36.3 -> 0.36.3

build_kube() {
  local src=$cache/src
  mkdir -p "$src"
  cd "$src"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 (replaced by local paths in its
  # own repository): pin each to the published v0.Y.Z instead.
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  local staging
  staging=$(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
  {
    echo "module virus-scanner.test/k8s-bin"
    echo
    echo "go $(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    for m in $staging; do echo "replace $m => $m v$staging_minor"; done
  } > go.mod
  go get "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" \
         "k8s.io/kubernetes/cmd/kubectl@v$K8S_VERSION" \
         "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S_VERSION" >&2
  # Release builds stamp the version; without it kubectl and clients see v0.0.0-master.
  local minor=${K8S_VERSION#*.}
  minor=${minor%%.*}
  local stamp=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in kube-apiserver kubectl kube-controller-manager; do
    [ -x "$bin/$cmd" ] && continue
    go build -trimpath -ldflags="-s -w$stamp" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
    mv "$bin/$cmd.tmp" "$bin/$cmd"
  done
}

for b in "${need[@]}"; do
  case $b in
    kube-apiserver|kubectl|kube-controller-manager) build_kube; break ;;
  esac
done
if [ ! -x "$bin/helm" ]; then
  GOBIN=$bin go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
fi
if [ ! -x "$bin/kubeconform" ]; then
  GOBIN=$bin go install -trimpath "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" >&2
fi
if [ ! -x "$bin/etcd" ]; then
  # The crate carries the etcd release binary; a tiny program copies it out.
  tmp=$cache/etcd-extract
  mkdir -p "$tmp/src"
  cat > "$tmp/Cargo.toml" <<TOML
[package]
name = "etcd-extract"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
etcd-bin-vendored = { version = "=$ETCD_CRATE_VERSION", features = ["linux-x86_64"] }
[workspace]
TOML
  cat > "$tmp/src/main.rs" <<'RS'
fn main() {
    let out = std::env::args().nth(1).expect("output path");
    let path = etcd_bin_vendored::etcd_bin_path().expect("etcd binary for this platform");
    std::fs::copy(path, &out).expect("copy etcd");
}
RS
  (cd "$tmp" && CARGO_TARGET_DIR=$tmp/target cargo run -q --release -- "$bin/etcd.tmp" >&2)
  chmod +x "$bin/etcd.tmp"
  mv "$bin/etcd.tmp" "$bin/etcd"
fi
echo "$bin"
