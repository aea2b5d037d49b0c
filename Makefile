# ep-operator developer entry points.
#   make sandbox   the main job on an embedded default (simulators, throwaway Postgres, operator)
#   make test      everything CI runs: fmt check, clippy -D warnings, all tests
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo

.PHONY: all build test sandbox image image-rootfs crds manifests examples deps fmt lint unit clean bench-sync runner-static

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
	$(CARGO) build --locked -q -p runpod-sim -p kube-sim -p kubectl-ep -p ep-operator -p ep-runner -p ep-testkit --bins
	./target/debug/ep-sandbox

bench-sync: deps ## payload sync and hashing vs rclone, aws s3 sync and sha256sum (release build)
	command -v rclone >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq rclone >/dev/null || sudo apt-get install -y -qq rclone >/dev/null; }
	[ -x .tools/awscli/bin/aws ] || { python3 -m venv .tools/awscli && .tools/awscli/bin/pip install -q awscli; }
	$(CARGO) build --locked --release -p ep-testkit --bin bench-sync -p runpod-sim --bin runpod-sim
	./target/release/bench-sync

image: ## the operator image (static ep-operator + ep-runner, FROM scratch) as an OCI archive, with buildah
	scripts/image.sh build release

image-rootfs: ## stage image/rootfs for `docker build -f Containerfile .`
	scripts/image.sh rootfs release

runner-static: ## ep-runner as one static binary (glibc, static-pie) for any pod image
	$(CARGO) rustc --locked --release -p ep-runner --bin ep-runner -- -C target-feature=+crt-static
	@file target/release/ep-runner

crds: ## regenerate crds/ (and the chart's copy) from the types in api/
	$(CARGO) run --locked -q -p ep-operator -- crd --out-dir crds
	$(CARGO) run --locked -q -p ep-operator -- crd --out-dir charts/ep-operator/files/crds

manifests: deps ## re-render manifests/base from the chart's defaults (a test keeps them in sync)
	{ echo '# Rendered from charts/ep-operator with its default values by `make manifests`; a test fails when it is stale.'; \
	  .tools/bin/helm template ep-operator charts/ep-operator --namespace ep-system; } > manifests/base/ep-operator.yaml

examples: deps ## regenerate the quickstart's code ConfigMap from train.py
	{ echo '# Generated from train.py by `make examples`; a test fails when it is stale.'; \
	  KUBECONFIG=/dev/null .tools/bin/kubectl create configmap quickstart-code -n ep-quickstart \
	    --from-file=examples/quickstart/train.py --dry-run=client -o yaml; } > examples/quickstart/40-code.configmap.yaml

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .tools
