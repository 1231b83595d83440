# allocsvc developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Cargo.toml rust_core/Cargo.toml rust_core/py/Cargo.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP) ## create .venv and install allocsvc (Rust extension included) with dev tools

build: $(STAMP) ## rebuild the Rust extension into .venv after Rust changes
	$(PIP) install -q -e '.[dev]'

run: $(STAMP) ## install and start the server (embedded PostgreSQL, no Redis)
	$(VENV)/bin/allocsvc serve

demo: $(STAMP) ## a short run of the Rust core from Python
	$(PY) -m allocsvc.demo

proto: $(STAMP) ## regenerate src/allocsvc/_proto from proto/
	$(PY) scripts/gen_proto.py

docs: $(STAMP) ## regenerate docs/API.md from the .proto comments and docs/architecture.svg
	$(PY) scripts/gen_api_docs.py
	dot -Tsvg docs/architecture.dot -o docs/architecture.svg

lint: $(STAMP) ## ruff, mypy --strict, stubtest, cargo fmt and clippy, generated-code check
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest allocsvc._core --allowlist scripts/stubtest-allowlist.txt
	$(PY) scripts/gen_proto.py --check
	$(PY) scripts/gen_api_docs.py --check
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-rust: ## cargo test of the pure Rust core (no Python needed)
	cargo test -p allocsvc-core --release

test-py: $(STAMP) ## pytest: unit, integration (real Postgres and Redis) and end-to-end
	$(PY) -m pytest $(PYTEST_ARGS)

test: dev lint test-rust test-py ## install everything, then lint and run every Rust and Python test

bench: $(STAMP) ## benchmarks (pytest-benchmark) of the core; see bench/RESULTS.md
	$(PY) -m pytest bench -p no:randomly --benchmark-enable --benchmark-columns=median,mean,ops,rounds -q $(PYTEST_ARGS)

bench-load: $(STAMP) ## load test with ghz: allocsvc vs a bare grpc.aio echo server (a few minutes; see bench/RESULTS.md)
	$(PY) bench/load/run.py $(LOAD_ARGS)

bench-load-h2: $(STAMP) ## load test with h2load (closed loop, unary and AllocateBatch x1000) and bench/load/openloop (Go, fixed rates): echo, --workers 1, --in-memory, --workers 2 (~15-25 minutes)
	$(PY) bench/load/h2.py $(LOAD_ARGS)

bench-ab: $(STAMP) ## this tree against BASE=<commit> under h2load, both served at once, alternating rounds (~5 minutes)
	$(if $(BASE),,$(error BASE=<commit> is required, e.g. make bench-ab BASE=HEAD~1))
	$(PY) bench/load/ab.py --base $(BASE) $(LOAD_ARGS)

bench-profile-batch: $(STAMP) ## where a --in-memory server's event loop spends AllocateBatch x1000 under h2load (LOAD_ARGS=--perf: perf samples by kind; ~1 minute)
	$(PY) bench/load/batch_profile.py $(LOAD_ARGS)

bench-waiting: $(STAMP) ## memory of calls waiting for a busy server (backpressure.max_waiting_calls), unary and AllocateBatch x1000 (~1 minute)
	$(PY) bench/load/waiting.py $(LOAD_ARGS)

bench-unary-parts: $(STAMP) ## what each part of a unary Allocate costs under load: echo and allocsvc with parts taken out, at one fixed rate (~6 minutes)
	$(PY) bench/load/unary_parts.py $(LOAD_ARGS)

bench-instructions: $(STAMP) ## instructions a unary Allocate costs, counted under callgrind (not moved by the host's drift): echo and allocsvc with parts taken out (~2 minutes)
	$(PY) bench/load/instructions.py $(LOAD_ARGS)

clean: ## remove build outputs (keeps .venv)
	rm -rf target dist .pytest_cache .mypy_cache .ruff_cache

.PHONY: help dev build run demo proto docs lint test-rust test-py test bench clean
