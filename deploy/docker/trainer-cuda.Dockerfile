# syntax=docker/dockerfile:1.7
# The trainer image for NVIDIA GPUs: built in CUDA's devel image (candle's CUDA kernels need
# nvcc), run in its runtime image (cuBLAS, cuRAND, NCCL; the driver comes from the node through
# the NVIDIA container toolkit).
#
#   docker build -f deploy/docker/trainer-cuda.Dockerfile -t atmorep/trainer-cuda:0.1.0 \
#       --build-arg CUDA_COMPUTE_CAP=90 .
#
# It builds the `nccl` feature: data-parallel training over NCCL, one GPU per rank (libcuda and
# libnccl are loaded at run time). NOTE: the workspace has no `cuda` feature yet (see
# deploy/README.md), so the model itself still computes on the CPU; once it exists, build with
# `--build-arg FEATURES="--features cuda,nccl"`. CUDA_COMPUTE_CAP selects the GPU generation
# candle's kernels will be compiled for (80: A100, 89: L4/L40, 90: H100/H200); there is no GPU
# at build time to ask.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu24.04
ARG RUST_VERSION=1.95

# The Rust toolchain, taken from the official image rather than downloaded by a script.
FROM rust:${RUST_VERSION}-bookworm AS rust

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates cmake pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:$PATH
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
ARG FEATURES="--features nccl"
# hadolint ignore=SC2086
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin atmorep ${FEATURES} \
 && install -m 0755 target/release/atmorep /usr/local/bin/atmorep

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS trainer
COPY --from=build /usr/local/bin/atmorep /usr/local/bin/atmorep
RUN mkdir -p /runs && chown 65532:65532 /runs
USER 65532:65532
WORKDIR /runs
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 9465
ENTRYPOINT ["atmorep"]
CMD ["train", "--config", "/etc/atmorep/train.toml", "--loader", "http://loader:50051", "--out", "/runs/train", "--metrics-bind", "0.0.0.0:9465", "--quiet"]
