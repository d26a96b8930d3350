# syntax=docker/dockerfile:1
# One image for every seckill process: /usr/local/bin/seckill-operator and
# /usr/local/bin/seckill-worker (command, query, projector), statically linked
# against musl, on distroless static as the non-root user 65532.
#
#   docker build -t ghcr.io/seckill/seckill:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/seckill/seckill:0.1.0 .

FROM rust:1-bookworm AS builder
# musl-tools: the C compiler `ring` (TLS) needs for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
ARG TARGETARCH
RUN case "${TARGETARCH:-$(dpkg --print-architecture)}" in \
      amd64) echo x86_64-unknown-linux-musl > /rust-target ;; \
      arm64) echo aarch64-unknown-linux-musl > /rust-target ;; \
      *) echo "unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY workers workers
COPY operator operator
# Workspace members cargo must see to resolve the lock file; nothing of
# them is built (the `seckill` CLI and the test kit are not in the image).
COPY cli cli
COPY testkit testkit
# Cache mounts keep the registry and the build directory between builds; the
# binaries are copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(cat /rust-target)" \
 && cargo build --release --locked --target "$target" \
      -p seckill-workers --bin seckill-worker \
      -p seckill-operator --bin seckill-operator \
 && mkdir -p /out \
 && cp "target/$target/release/seckill-worker" "target/$target/release/seckill-operator" /out/

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="seckill" \
      org.opencontainers.image.description="seckill flash-sale coupons: operator and workers" \
      org.opencontainers.image.source="https://github.com/seckill/seckill" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder --chown=0:0 --chmod=0555 /out/seckill-worker /out/seckill-operator /usr/local/bin/
USER 65532:65532
EXPOSE 8080 9090
# The processes serve /healthz themselves; Kubernetes probes them (the image
# has no shell or client to run a HEALTHCHECK with).
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/seckill-worker"]
CMD ["--help"]
