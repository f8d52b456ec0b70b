# The two commands: `make run` (the pipeline on this machine) and `make test` (every test).
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(CURDIR)/.tools/bin:$(PATH)
# From-scratch builds (CI's fresh clone) are faster without incremental state, and the target
# directory stays several GB smaller.
CARGO_INCREMENTAL ?= 0
export CARGO_INCREMENTAL

.PHONY: run test test-nats-min tools lint deny openapi screenshots fmt bench bench-cpu bench-held bench-isolation bench-admin-reads bench-pglog bench-log clean

run:
	scripts/run-local.sh

# Installs what the tests need (nats-server, PostgreSQL's server binaries, cargo-deny, Chromium + playwright-core for the
# console's browser test, the OpenAPI validator; the deploy checks install their own tools),
# then lints, vets the dependencies, validates the OpenAPI document, and runs every test on the
# pinned nats-server (scripts/nats-versions.env), the tests that start a nats-server again on the
# oldest supported release, and the deploy checks.
test: tools lint deny openapi
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
	@echo "postgresql (server binaries for the tests' private server): $$(scripts/ensure-postgres.sh)"
	@echo "cargo-deny: $$(scripts/ensure-cargo-deny.sh)"
	@echo "chromium: $$(scripts/ensure-browser.sh)"
	@echo "openapi-spec-validator: $$(scripts/ensure-openapi-validator.sh)"
	bash deploy/check.sh --install-only

lint:
	python3 scripts/check-structure.py
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# cargo deny (deny.toml): licences, banned and duplicate crates, sources. Advisories need the
# RustSec database, a git repository on GitHub: checked when it can be fetched, otherwise said
# so and skipped (see README, "Development"); the fetch gets two minutes. Duplicate-version
# warnings come without their inclusion graphs: `cargo-deny check bans` (the binary that
# scripts/ensure-cargo-deny.sh prints) shows them.
deny:
	@deny="$$(scripts/ensure-cargo-deny.sh)" && \
	"$$deny" check --hide-inclusion-graph licenses bans sources && \
	if timeout 120 "$$deny" fetch db >/dev/null 2>&1; then \
	  "$$deny" check --hide-inclusion-graph advisories; \
	else \
	  echo "cargo deny: advisories NOT checked: the RustSec advisory database (a git repository on GitHub) could not be fetched from this machine." >&2; \
	fi

# The admin API's OpenAPI document, checked by an independent validator (PyPI's
# openapi-spec-validator, pinned in scripts/openapi-validator.txt). That the document matches
# the routes is tests/it/openapi.rs, part of `cargo test`.
openapi:
	"$$(scripts/ensure-openapi-validator.sh)" admin/openapi.json

# Refreshes the console's screenshots in docs/ (the browser test writes them there).
screenshots:
	@scripts/ensure-browser.sh >/dev/null
	CONSOLE_SCREENSHOTS=$(CURDIR)/docs $(CARGO) test -p integration-tests --locked --test it console::

fmt:
	$(CARGO) fmt --all

# The benchmark (not a test: not part of `make test`): release build, then the pipeline and its
# floors under load on this machine. `make bench BENCH_ARGS=--quick` for a short run; results
# and how to read them in tests/bench/RESULTS.md.
bench:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	ECWID_TEST_PG_DURABLE=1 NATS_SERVER_BIN="$$(scripts/ensure-nats-server.sh)" ./target/release/bench $(BENCH_ARGS)

# What a paused instance's 10,000 held events cost (CPU of nats-server and the services against
# idle) and how fast they are released; ~2 min. Not part of `make bench` (which has its own idle
# figure): run it when the hold changes.
bench-held:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	ECWID_TEST_PG_DURABLE=1 NATS_SERVER_BIN="$$(scripts/ensure-nats-server.sh)" ./target/release/bench held

# A stalled instance beside a healthy one: the healthy one's p99 alone and beside it; ~1.5 min.
bench-isolation:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	ECWID_TEST_PG_DURABLE=1 NATS_SERVER_BIN="$$(scripts/ensure-nats-server.sh)" ./target/release/bench isolation

# Admin reads at full speed (six event-log searches the index cannot narrow) beside webhooks at
# a fixed rate: the webhooks' p50 with the readers against without; ~1 min.
bench-admin-reads:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	ECWID_TEST_PG_DURABLE=1 NATS_SERVER_BIN="$$(scripts/ensure-nats-server.sh)" ./target/release/bench admin-reads

# The event log at size: 10,000,000 records in the pipeline's PostgreSQL (the same rows the
# writer makes, filled server-side), then the admin API's lookups by id, objectId and
# instance+status+window, timed; the database's size per million records and nats-server's
# memory before and after. `make bench-log BENCH_LOG_ARGS="--log-records 1000000"` for less.
bench-log:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	ECWID_TEST_PG_DURABLE=1 NATS_SERVER_BIN="$$(scripts/ensure-nats-server.sh)" ./target/release/bench log --log-records 10000000 $(BENCH_LOG_ARGS)

# Instructions per event of each service (valgrind's callgrind) on a fixed workload; not a test.
# `make bench-cpu BENCH_CPU_ARGS="--events 500"`; method and figures in tests/bench/RESULTS.md.
# A payload filter's cost per event: the normalizer's figure with
# BENCH_CPU_ARGS="--filter \"objectType != ''\"" less the figure without it.
bench-cpu:
	$(CARGO) build --release --locked -p ingest -p normalizer -p deliverer -p bench --bins
	scripts/bench-cpu.sh $(BENCH_CPU_ARGS)

# What the event log would cost in PostgreSQL instead of JetStream, on this machine: CPU per
# record of the log's two writes, lookups with a million records (a private server; needs
# PostgreSQL's server package, as Debian's `postgresql`); ~40 s. RESULTS.md, "The event log in
# PostgreSQL".
bench-pglog:
	python3 tests/bench/pglog.py $(BENCH_PGLOG_ARGS)

clean:
	$(CARGO) clean
	rm -rf .data
