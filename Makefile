# seckill: `make demo` shows a flash sale on this machine; `make test` runs every test.
SHELL := /bin/bash
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/.tools/venv/bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: all demo test deps lint unit docs docs-check chart-test monitoring-test api-test faults bench build release crds

all: test

deps:
	@bash scripts/install-deps.sh redis helm python prometheus chromium

build:
	cargo build --workspace --all-targets

release:
	cargo build --release --workspace --bins

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q

unit:
	cargo test --workspace

test: deps lint unit docs-check chart-test monitoring-test api-test

docs:
	cargo build -q --workspace --bins
	python3 scripts/config-table.py

docs-check:
	cargo build -q --workspace --bins
	python3 scripts/config-table.py --check

chart-test:
	bash scripts/test-chart.sh

monitoring-test:
	bash scripts/test-monitoring.sh

api-test:
	bash scripts/test-openapi.sh

crds:
	cargo run -q -p seckill-operator --bin seckill-operator -- crd > crds/promotions.seckill.io.yaml
	cp crds/promotions.seckill.io.yaml charts/seckill/crds/promotions.seckill.io.yaml

demo:
	@bash scripts/install-deps.sh redis
	bash scripts/demo.sh

faults:
	@bash scripts/install-deps.sh redis
	bash scripts/faults.sh

bench:
	@bash scripts/install-deps.sh redis bench
	bash scripts/bench.sh
	bash scripts/bench-read-side.sh
	bash scripts/bench-cluster.sh
	bash scripts/bench-shards.sh
	bash scripts/bench-operator.sh
	bash scripts/bench-leader.sh
