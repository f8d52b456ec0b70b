# The two commands: `make run` (the pipeline on this machine) and `make test` (every test).
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: run test tools lint fmt bench clean

run:
	scripts/run-local.sh

# Installs what the tests need (nats-server; the deploy checks install their own tools),
# then lints and runs every test.
test: tools lint
	$(CARGO) build --workspace --locked --bins
	$(CARGO) test --workspace --locked --all-targets
	bash deploy/check.sh

tools:
	@echo "nats-server: $$(scripts/ensure-nats-server.sh)"
	bash deploy/check.sh --install-only

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

# The benchmark (not a test: not part of `make test`): release build, then the pipeline and its
# floors under load on this machine. `make bench BENCH_ARGS=--quick` for a short run; results
# and how to read them in tests/bench/RESULTS.md.
bench:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	NATS_SERVER_BIN="$$(scripts/ensure-nats-server.sh)" ./target/release/bench $(BENCH_ARGS)

clean:
	$(CARGO) clean
	rm -rf .data
