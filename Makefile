# The two commands of the README: `make demo` (the main job) and `make test` (everything CI runs).
# Both set up ./.venv from the project's own files; nothing else needs installing by hand.

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip install --quiet

.PHONY: demo test lint typecheck rust-test py-test bench venv

$(PYTHON):
	python3 -m venv $(VENV)

venv: $(PYTHON)

# The bundled model and sample photo ship inside the package: no extra, no download, no torch.
demo: $(PYTHON)
	$(PIP) -e .
	$(VENV)/bin/vaelink demo

test: $(PYTHON)
	$(PIP) -e '.[dev]'
	$(MAKE) rust-test lint py-test

rust-test:
	cargo test --workspace --exclude vaelink-py

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches models fuzz
	$(VENV)/bin/ruff format --check python tests benches models fuzz
	$(MAKE) typecheck

# The type checker over the package, and the stub of the compiled module checked against it.
typecheck:
	$(VENV)/bin/mypy
	$(PYTHON) -m mypy.stubtest vaelink._native

py-test:
	$(PYTHON) -m pytest

bench: $(PYTHON)
	$(PIP) -e '.[bench]'
	$(PYTHON) benches/bench_core.py
