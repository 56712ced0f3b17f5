# The one entry point: CI runs `make ci` (through .ci/run); developers run the same targets.
.PHONY: test test-no-docker lint ci bench e2e dist image image-test chart

# Every test: unit, loopback gRPC against the simulated cloud and the cloud fakes, CLI, and the
# Docker driver on a real (private, throw-away) Docker engine that this target starts and stops.
test:
	@bash -c 'set -euo pipefail; \
	  bash tests/docker/engine.sh start; \
	  trap "bash tests/docker/engine.sh stop" EXIT; \
	  eval "$$(bash tests/docker/engine.sh env)"; \
	  cargo test -- --include-ignored'

# The same without the Docker engine (its tests show as ignored).
test-no-docker:
	cargo test

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# p50/p99 of the hot RPCs at 10,000 instances; not part of CI.
bench:
	cargo bench --bench rpc_latency

# The real cluster-autoscaler against Flotilla and a real kube-apiserver (see the README).
e2e:
	bash tests/e2e/run

# The container image (Dockerfile): a static musl binary, CA certificates and a passwd file
# staged under build/dist, then `docker build` (the legacy builder: no base image, no network).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= flotilla:$(VERSION)
MUSL := x86_64-unknown-linux-musl
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

dist:
	@rustup target list --installed | grep -qx $(MUSL) || { echo "the $(MUSL) Rust target is missing: rustup target add $(MUSL)"; exit 1; }
	@command -v musl-gcc >/dev/null || { echo "installing musl-tools (musl-gcc, for ring's C code)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q musl-tools; }
	CC_x86_64_unknown_linux_musl=musl-gcc CARGO_PROFILE_RELEASE_STRIP=symbols \
	  cargo build --release --locked --target $(MUSL) --bin flotilla
	rm -rf build/dist
	mkdir -p build/dist/linux-amd64 build/dist/rootfs/etc/ssl/certs build/dist/rootfs/tmp
	cp $(TARGET_DIR)/$(MUSL)/release/flotilla build/dist/linux-amd64/flotilla
	cp /etc/ssl/certs/ca-certificates.crt build/dist/rootfs/etc/ssl/certs/
	printf 'root:x:0:0:root:/:/sbin/nologin\nflotilla:x:65532:65532:flotilla:/nonexistent:/sbin/nologin\n' >build/dist/rootfs/etc/passwd
	printf 'root:x:0:\nflotilla:x:65532:\n' >build/dist/rootfs/etc/group
	chmod 1777 build/dist/rootfs/tmp

image: dist
	DOCKER_BUILDKIT=0 docker build -t $(IMAGE) .

# Builds the image on the private Docker engine of tests/docker/engine.sh and runs it: --version,
# check-config, and serve (as user 65532 on a read-only root) answering `flotilla ctl`.
image-test: dist
	bash tests/image/run $(IMAGE)

# helm lint/template and the chart's checks, no cluster needed (tests/chart/run).
chart:
	bash tests/chart/run

# The end-to-end suite runs when cluster-autoscaler can be had (cached, or from the module proxy).
ci: lint test chart
	@if rustup target list --installed | grep -qx $(MUSL); then $(MAKE) --no-print-directory image-test; \
	else echo "image: NOT RUN: the $(MUSL) Rust target is not installed (rustup target add $(MUSL))"; exit 1; fi
	@if bash tests/e2e/run --check-ca; then bash tests/e2e/run; \
	else echo "e2e: NOT RUN: cluster-autoscaler cannot be built here (see above); the suite needs it"; fi
