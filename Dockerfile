# Multi-stage build of the ringvip binary (Debian, to match the CI machine).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY integration ./integration
RUN cargo build --release --locked --bin ringvip

FROM debian:bookworm-slim
COPY --from=build /src/target/release/ringvip /usr/local/bin/ringvip
COPY config/examples /etc/ringvip/manifests
# NodePorts >= 1024 need no capability; ports below need CAP_NET_BIND_SERVICE.
# File mode runs as nobody; config/daemonset.yaml (--kube, TUN) runs it as root
# with every capability dropped but NET_ADMIN and NET_BIND_SERVICE.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ringvip"]
CMD ["run", "--manifests", "/etc/ringvip/manifests", "--health-addr", "0.0.0.0:10256"]
