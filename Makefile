# The two commands: `make run` (the pipeline on this machine) and `make test` (every test).
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: run test test-nats-min tools lint fmt bench bench-cpu clean

run:
	scripts/run-local.sh

# Installs what the tests need (nats-server; the deploy checks install their own tools),
# then lints and runs every test on the pinned nats-server (scripts/nats-versions.env), the tests
# that start a nats-server again on the oldest supported release, and the deploy checks.
test: tools lint
	$(CARGO) build --workspace --locked --bins
	$(CARGO) test --workspace --locked --all-targets
	$(MAKE) --no-print-directory test-nats-min
	bash deploy/check.sh

# Every test that starts a nats-server (the integration-tests package), on the oldest supported
# release (NATS_MIN_VERSION: Debian's package, installed when missing).
test-nats-min:
	@bin="$$(scripts/ensure-nats-server.sh --min)" && echo "nats-server (minimum supported): $$($$bin --version)" && \
	  NATS_SERVER_BIN="$$bin" $(CARGO) test --locked -p integration-tests --tests

tools:
	@echo "nats-server (pinned): $$(scripts/ensure-nats-server.sh)"
	@echo "nats-server (minimum supported): $$(scripts/ensure-nats-server.sh --min)"
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

# Instructions per event of each service (valgrind's callgrind) on a fixed workload; not a test.
# `make bench-cpu BENCH_CPU_ARGS="--events 500"`; method and figures in tests/bench/RESULTS.md.
bench-cpu:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	scripts/bench-cpu.sh $(BENCH_CPU_ARGS)

clean:
	$(CARGO) clean
	rm -rf .data
