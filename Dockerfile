# syntax=docker/dockerfile:1
# Multi-stage build of the project's binaries on a non-root distroless runtime.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && for b in virus-scanner-handler virus-scanner-producer virus-scanner-operator virus-scan-operator; do \
      if [ -f "target/release/$b" ]; then cp "target/release/$b" /out/; fi; \
    done

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/virus-scanner-handler"]
