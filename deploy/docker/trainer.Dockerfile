# syntax=docker/dockerfile:1.7
# The trainer image (CPU): `atmorep train` against one or more loaders. It needs no storage
# credentials: batches arrive over gRPC.
#
#   docker build -f deploy/docker/trainer.Dockerfile -t atmorep/trainer:0.1.0 .
ARG RUST_VERSION=1.95
ARG DEBIAN=trixie

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Once the workspace has a `trainer` feature: --build-arg FEATURES="--no-default-features --features trainer".
ARG FEATURES=""
# hadolint ignore=SC2086
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin atmorep ${FEATURES} \
 && install -m 0755 target/release/atmorep /usr/local/bin/atmorep

FROM debian:${DEBIAN}-slim AS trainer
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/atmorep /usr/local/bin/atmorep
RUN mkdir -p /runs && chown 65532:65532 /runs
USER 65532:65532
WORKDIR /runs
# Prometheus /metrics (`--metrics-bind`).
EXPOSE 9465
ENTRYPOINT ["atmorep"]
CMD ["train", "--config", "/etc/atmorep/train.toml", "--loader", "http://loader:50051", "--out", "/runs/train", "--metrics-bind", "0.0.0.0:9465", "--quiet"]
