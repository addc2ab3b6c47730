# pgtide in a container: build with the Rust image, run on Debian slim.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY jobs jobs
COPY sql sql
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/pgtide pgtide && mkdir -p /etc/pgtide /var/lib/pgtide && chown pgtide /var/lib/pgtide
COPY --from=build /src/target/release/pgtide /usr/local/bin/pgtide
USER pgtide
WORKDIR /etc/pgtide
ENV PGTIDE_CONFIG=/etc/pgtide/pgtide.toml
ENTRYPOINT ["pgtide"]
CMD ["run-once"]
