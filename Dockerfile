# syntax=docker/dockerfile:1
# Build: docker build --build-arg GRAFT_COMMIT=$(git rev-parse --short HEAD) -t graft .
# Run:   docker run -p 5001:5001 -v graft-data:/var/lib/graft graft serve --upstream https://registry.internal

FROM rust:1-bookworm AS build
WORKDIR /src
# The data directory, made here because the runtime image has no shell to
# make it: private to its owner (it holds the index and the credentials
# secret), handed to the runtime user by the COPY --chown below.
RUN install -d -m 0700 /out/lib/graft
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_paths.rs \
    && cargo build --release --locked && rm -rf src benches
# The commit `graft --version` names (build.rs; no .git is copied in).
ARG GRAFT_COMMIT=unknown
COPY build.rs ./
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin graft

# distroless/cc: glibc, CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/graft /usr/local/bin/graft
# Copying the parent's contents makes `graft` itself a copied entry, so it is
# the directory that gets the owner (65532 = nonroot in distroless); a named
# volume mounted there starts as a copy of it, owner and mode included.
COPY --from=build --chown=65532:65532 /out/lib/ /var/lib/
COPY config/graft.toml /etc/graft/graft.toml
ENV GRAFT_CONFIG=/etc/graft/graft.toml \
    GRAFT_LISTEN=0.0.0.0:5001 \
    GRAFT_DATA_DIR=/var/lib/graft
VOLUME ["/var/lib/graft"]
EXPOSE 5001
USER nonroot:nonroot
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/graft", "healthcheck", "--url", "http://127.0.0.1:5001/healthz"]
ENTRYPOINT ["/usr/local/bin/graft"]
CMD ["serve"]
