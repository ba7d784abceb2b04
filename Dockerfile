# One image for every meterflow binary: meterflow (CLI), meterflow-collector,
# meterflow-enricher, meterflow-rater, meterflow-settler.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/meterflow target/release/meterflow-collector \
       target/release/meterflow-enricher target/release/meterflow-rater \
       target/release/meterflow-settler /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/meterflow --create-home meterflow \
 && install -d -o meterflow /var/lib/meterflow/settlements
COPY --from=build /out/ /usr/local/bin/
COPY rules/ /etc/meterflow/rules/
USER meterflow
WORKDIR /var/lib/meterflow
ENV METERFLOW__HTTP__LISTEN=0.0.0.0:9100
EXPOSE 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD curl -fsS http://127.0.0.1:9100/healthz || exit 1
CMD ["meterflow", "--help"]
