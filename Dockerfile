# The `wallet` binary (crate `wallet`) on a slim Debian runtime.
#
#   docker build -t wallet .
#   docker run --rm -v "$PWD/deploy/compose-config.json:/etc/wallet/config.json:ro" -p 8080:8080 wallet
#
# docker-compose.yml builds this image and runs it beside four PostgreSQL shards.

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# 1. Third-party dependencies only, in a layer that is rebuilt only when a
#    manifest or Cargo.lock changes. Every workspace crate is replaced by an
#    empty stub so that `cargo build` compiles just the dependencies.
#    The stubs' own build output is then removed (`cargo clean -p`), so this
#    layer holds no artifact of a workspace crate: step 2 always compiles
#    every workspace crate from the real sources, and the SQL
#    that shard-agent embeds at compile time (sql/shard, sql/catalog via
#    refinery's embed_migrations!, sql/shard/functions via include_str!) is
#    always the SQL in the build context.
#    If a crate gains a build.rs or a new workspace member is added, mirror
#    it here.
COPY Cargo.toml Cargo.lock ./
COPY router/Cargo.toml router/Cargo.toml
COPY shard-agent/Cargo.toml shard-agent/Cargo.toml
COPY coordinator/Cargo.toml coordinator/Cargo.toml
COPY wallet/Cargo.toml wallet/Cargo.toml
COPY checker/Cargo.toml checker/Cargo.toml
COPY local-cluster/Cargo.toml local-cluster/Cargo.toml
COPY testkit/Cargo.toml testkit/Cargo.toml
COPY wallet-dev/Cargo.toml wallet-dev/Cargo.toml
COPY wallet-bench/Cargo.toml wallet-bench/Cargo.toml
COPY chaos-tests/Cargo.toml chaos-tests/Cargo.toml
# The library crates get an empty lib.rs; `wallet`, a binary only, an empty main.
RUN set -eux; \
    libs="router shard-agent coordinator checker local-cluster testkit wallet-dev wallet-bench chaos-tests"; \
    for crate in $libs; do \
        mkdir -p "$crate/src"; \
        : > "$crate/src/lib.rs"; \
    done; \
    mkdir -p wallet/src; \
    echo 'fn main() {}' > wallet/src/main.rs; \
    cargo build --release --locked --bin wallet; \
    cargo clean --release --locked -p wallet $(for crate in $libs; do echo "-p $crate"; done); \
    rm -rf wallet/src $(for crate in $libs; do echo "$crate/src"; done)

# 2. The workspace itself. All of it is needed: the crates embed sql/ at
#    compile time. Cargo.toml and Cargo.lock were copied in step 1.
COPY router router
COPY shard-agent shard-agent
COPY coordinator coordinator
COPY wallet wallet
COPY checker checker
COPY local-cluster local-cluster
COPY testkit testkit
COPY wallet-dev wallet-dev
COPY wallet-bench wallet-bench
COPY chaos-tests chaos-tests
COPY sql sql
RUN cargo build --release --locked --bin wallet \
 && cp target/release/wallet /usr/local/bin/wallet

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim

# No OpenSSL: the service talks to PostgreSQL without TLS (NoTls).
# ca-certificates is kept for any outbound HTTPS a later version may make.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 wallet \
 && useradd --system --uid 10001 --gid wallet \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin wallet

COPY --from=builder /usr/local/bin/wallet /usr/local/bin/wallet

# Numeric so that runtimes checking runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8080

# No HEALTHCHECK: this image has no HTTP client (no curl/wget). Liveness is
# GET /healthz and readiness (every shard answers) is GET /readyz on port 8080;
# probe them from the orchestrator.
#
# `serve` applies the schema migrations and the shard's SQL functions at start,
# and refuses to serve shards whose functions a newer build applied; the
# catalog and shard databases must already exist. It stops cleanly on SIGTERM (docker stop).
# (`wallet dev` is not usable here: it needs local PostgreSQL binaries.)
ENTRYPOINT ["/usr/local/bin/wallet"]
CMD ["serve", "--config", "/etc/wallet/config.json"]
