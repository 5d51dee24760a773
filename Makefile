# virus-scanner: build, test, run and benchmark.
#
# Heavy build output lives outside the clone so that a fresh clone builds incrementally.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/virus-scanner/target
CARGO ?= cargo
# Integration tests start real services; two test threads keep a 2-core machine responsive.
TEST_THREADS ?= 2

.PHONY: all build deps k8s-bin test test-unit lint fmt run bench crds

## kube-apiserver, kubectl, kube-controller-manager, helm, kubeconform and etcd, cached.
k8s-bin:
	hack/k8s-bin.sh

all: build

build:
	$(CARGO) build --workspace --release --bins

deps:
	hack/install-deps.sh

## Every test tier: unit tests; integration tests against real redis-server, clamd and Envoy;
## the Kubernetes tier against a real etcd and kube-apiserver (binaries built from Go modules
## once, cached in ~/.cache/virus-scanner/k8s).
test: deps
	K8S_BIN_DIR=$$(hack/k8s-bin.sh) && export K8S_BIN_DIR && \
	$(CARGO) test --workspace --features virus-scanner-test-support/kube --no-fail-fast \
		-- --test-threads $(TEST_THREADS)

test-unit:
	$(CARGO) test --workspace --lib --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

fmt:
	$(CARGO) fmt --all

## The CRD YAML in crds/, generated from the Rust types (a unit test fails when it is stale).
CRD_FILE := crds/virusscanpolicies.virusscan.aether-platform.io.yaml
crds:
	$(CARGO) run -q -p virus-scan-operator -- crd > $(CRD_FILE).tmp && mv $(CRD_FILE).tmp $(CRD_FILE)

## The local stack on loopback ports, in ./.run (stopped with Ctrl-C).
run: deps
	$(CARGO) build --release --bins
	hack/run-local.sh

## Throughput against raw clamd INSTREAM on the same clamd; figures as a markdown table.
bench: deps
	$(CARGO) build --release --bins
	$(CARGO_TARGET_DIR)/release/virus-scanner-bench queue $(BENCH_ARGS)
	$(CARGO_TARGET_DIR)/release/virus-scanner-bench envoy --sizes 1K,1M $(BENCH_ARGS)
	$(CARGO_TARGET_DIR)/release/virus-scanner-bench icap --sizes 1K,1M,10M $(BENCH_ARGS)
