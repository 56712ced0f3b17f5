# Flotilla's container image: one static binary, CA certificates, a non-root user, no shell.
#
# The binary is built outside (`make image` does both steps): the image needs no Rust toolchain,
# no base image and no network, so it builds the same on a laptop, in CI and offline.
#   make image                      # build/dist/linux-amd64/flotilla, then `docker build`
# Multi-arch (see the README, "Container image"): put each static binary under
# build/dist/linux-<arch>/ and run
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/flotilla:TAG --push .
FROM scratch

# Set by buildx for each platform; the legacy builder uses the default.
ARG TARGETARCH=amd64

# /etc/passwd and /etc/group (user flotilla, 65532), the CA bundle, and an empty /tmp.
COPY build/dist/rootfs/ /
COPY build/dist/linux-${TARGETARCH}/flotilla /usr/local/bin/flotilla

ENV PATH=/usr/local/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
# gRPC (cluster-autoscaler), HTTP (/healthz, /readyz, /metrics).
EXPOSE 8086 8087
ENTRYPOINT ["/usr/local/bin/flotilla"]
CMD ["serve"]

LABEL org.opencontainers.image.title="flotilla" \
      org.opencontainers.image.description="An externalgrpc cloud provider for the Kubernetes cluster-autoscaler" \
      org.opencontainers.image.licenses="Apache-2.0"
