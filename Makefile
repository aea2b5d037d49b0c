# ep-operator developer entry points.
#   make sandbox   the main job on an embedded default (simulators, throwaway Postgres, operator)
#   make test      everything CI runs: fmt check, clippy -D warnings, all tests
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo

.PHONY: all build test sandbox crds deps fmt lint unit clean

all: build

deps: ## install what is missing (PostgreSQL server, npm, unzip, kubectl, helm)
	@scripts/deps.sh

build:
	$(CARGO) build --workspace --locked

test: deps ## what CI runs
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked

unit: ## fast: unit tests only, no servers
	$(CARGO) test --workspace --locked --lib

sandbox: deps ## the main job on an embedded default; KEEP=1 keeps it running
	$(CARGO) run --locked -q -p ep-testkit --bin ep-sandbox

crds: ## regenerate crds/ from the types in api/
	$(CARGO) run --locked -q -p ep-operator -- crd --out-dir crds

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .tools
