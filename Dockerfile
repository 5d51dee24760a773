# syntax=docker/dockerfile:1
# The project's binaries on a non-root distroless runtime.
#   docker build --build-arg FLAVOR=producer|consumer|operator|all -t virus-scanner .
# FLAVOR=all (the default) holds every binary; the chart and the injector run them by name
# (`command: [virus-scanner-producer]`), so one image serves every role.
ARG FLAVOR=all

FROM rust:1.95-bookworm AS build
ARG FLAVOR
WORKDIR /src
COPY . .
# $pkgs is a list of cargo arguments: word splitting is wanted.
# hadolint ignore=SC2086
RUN set -eu; \
    case "$FLAVOR" in \
      producer) pkgs="-p virus-scanner-producer" ;; \
      consumer) pkgs="-p virus-scanner-consumer" ;; \
      operator) pkgs="-p virus-scan-operator" ;; \
      all) pkgs="-p virus-scanner-producer -p virus-scanner-consumer -p virus-scan-operator" ;; \
      *) echo "FLAVOR must be producer, consumer, operator or all, not $FLAVOR" >&2; exit 1 ;; \
    esac; \
    cargo build --release --locked --bins $pkgs; \
    mkdir -p /out; \
    for b in virus-scanner-producer virus-scanner-handler virus-scan-operator; do \
      if [ -f "target/release/$b" ]; then cp "target/release/$b" /out/; fi; \
    done

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG FLAVOR
LABEL org.opencontainers.image.source="https://github.com/aether-platform/virus-scanner" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="virus-scanner: ClamAV scanning for Envoy (ext_proc) and ICAP gateways (${FLAVOR})"
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
