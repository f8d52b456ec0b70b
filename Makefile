# The two commands: `make run` (the pipeline on this machine) and `make test` (every test).
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: run test tools lint fmt unit deploy-check bench fuzz clean

run:
	scripts/run-local.sh

# Installs what the tests need (nats-server; the deploy checks install their own tools),
# then lints and runs every test.
test: tools lint
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

clean:
	$(CARGO) clean
	rm -rf .data
