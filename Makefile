# The one entry point: CI runs `make ci` (through .ci/run); developers run the same targets.
.PHONY: test lint ci bench

# Every test: unit, loopback gRPC, CLI.
test:
	cargo test

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# p50/p99 of the hot RPCs at 10,000 instances; not part of CI.
bench:
	cargo bench --bench rpc_latency

ci: lint test
