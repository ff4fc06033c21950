# rl4pix-server image. CPU by default, with the default model inside:
#   docker build -t rl4pix .
#   docker run -p 8080:8080 rl4pix
# CUDA variant (needs the NVIDIA container toolkit at run time):
#   docker build --build-arg VARIANT=cuda --build-arg CUDA_COMPUTE_CAP=90 -t rl4pix:cuda .
#   docker run --gpus all -p 8080:8080 rl4pix:cuda
ARG VARIANT=cpu
ARG RUST_VERSION=1.95
ARG CUDA_VERSION=12.4.1

# ---- build stages -------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p rl4pix-server \
 && cp target/release/rl4pix-server /rl4pix-server

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-cuda
ARG RUST_VERSION
# Candle compiles its kernels for this compute capability (no GPU is visible while building).
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} PATH=/root/.cargo/bin:${PATH}
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p rl4pix-server --features cuda \
 && cp target/release/rl4pix-server /rl4pix-server

FROM build-${VARIANT} AS build

# ---- runtime stages -----------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime-cpu
ENV RL4PIX_DEVICE=cpu

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime-cuda
ENV RL4PIX_DEVICE=cuda:0

FROM runtime-${VARIANT}
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /app --uid 10001 rl4pix
WORKDIR /app
COPY --from=build /rl4pix-server /usr/local/bin/rl4pix-server
# The embedded default model (model/assets/toy) is what the server serves without --model, found
# relative to the working directory /app; with no RL4PIX_ADAPTERS it serves the shipped
# model/assets/adapters (read-only) and applies toy-rl by default. Mount a folder and set
# RL4PIX_ADAPTERS=/app/adapters to manage adapters through the admin routes instead.
COPY --from=build --chown=rl4pix /src/model/assets /app/model/assets
RUN mkdir -p /app/adapters && chown rl4pix /app/adapters
USER rl4pix
ENV RL4PIX_HOST=0.0.0.0 \
    RL4PIX_PORT=8080 \
    RUST_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# SIGTERM (docker stop) lets admitted edits finish before the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rl4pix-server"]
