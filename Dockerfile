# syntax=docker/dockerfile:1
# Multi-stage build of Conveyor's binaries. One image serves every role; the service's
# command picks it (conveyor-api, conveyor-worker; the worker spawns conveyor-mcp, which sits
# next to it; fake-llm is the demo model).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
ENV SQLX_OFFLINE=true
# The registry and target caches survive between builds (BuildKit); the binaries are copied
# out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins -p conveyor-api -p conveyor-worker -p conveyor-mcp -p conveyor-fake-llm \
    && mkdir -p /out \
    && cp target/release/conveyor-api target/release/conveyor-worker \
          target/release/conveyor-mcp target/release/fake-llm /out/

FROM debian:bookworm-slim AS runtime
# curl serves the compose health checks.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 conveyor
COPY --from=build /out/ /usr/local/bin/
USER conveyor
ENV API_ADDR=0.0.0.0:8080
# 8080: the API; 9464: a worker's /metrics and /healthz (WORKER_METRICS_ADDR).
EXPOSE 8080 9464
CMD ["conveyor-api"]
