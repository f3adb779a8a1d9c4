# syntax=docker/dockerfile:1.7
# The loader image: `atmorep loader serve` on the node that holds the data.
#
#   docker build -f deploy/docker/loader.Dockerfile -t atmorep/loader:0.1.0 .
#
# Build from the repository root (the context is the whole workspace; the build ignores what
# loader.Dockerfile.dockerignore lists). Built without the default `trainer` feature: the binary
# has `atmorep loader …` and no candle (tests/it/deploy.rs checks the dependency tree).
ARG RUST_VERSION=1.95
ARG DEBIAN=trixie

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
# aws-lc-sys (TLS of the object-store client) may build with cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG FEATURES="--no-default-features"
# hadolint ignore=SC2086
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin atmorep ${FEATURES} \
 && install -m 0755 target/release/atmorep /usr/local/bin/atmorep

FROM debian:${DEBIAN}-slim AS loader
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/atmorep /usr/local/bin/atmorep
# Unprivileged; the store is mounted read-only.
USER 65532:65532
# gRPC (with grpc.health.v1 for probes) and Prometheus /metrics.
EXPOSE 50051 9464
ENTRYPOINT ["atmorep"]
CMD ["loader", "serve", "--config", "/etc/atmorep/loader.toml"]
