# Multi-stage build of Conveyor's binaries. One image serves every role; the service's
# command picks it (conveyor-api, conveyor-worker; conveyor-mcp is spawned by the worker).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
ENV SQLX_OFFLINE=true
RUN cargo build --release --locked --bins -p conveyor-api -p conveyor-worker -p conveyor-mcp -p conveyor-e2e

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 conveyor
COPY --from=build /src/target/release/conveyor-api /src/target/release/conveyor-worker \
     /src/target/release/conveyor-mcp /src/target/release/fake-llm /usr/local/bin/
USER conveyor
ENV API_ADDR=0.0.0.0:8080
EXPOSE 8080
CMD ["conveyor-api"]
