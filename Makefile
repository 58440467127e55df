# The two commands of the README: `make demo` (the main job) and `make test` (everything CI runs).
# Both set up ./.venv from the project's own files; nothing else needs installing by hand.

VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip install --quiet
# The local engine's runtime for `make demo`: cpu (onnxruntime) or gpu (onnxruntime-gpu), never both.
RUNTIME ?= cpu

.PHONY: demo test lint typecheck rust-test py-test bench venv pip wheel build-tools

$(PYTHON):
	python3 -m venv $(VENV)

venv: $(PYTHON)

# vaelink-core builds libjpeg-turbo from source: cmake, and nasm for its x86 SIMD. Debian's packages
# where they are missing (as root, or through sudo).
APT := $(if $(filter 0,$(shell id -u)),,sudo) apt-get
build-tools:
	@command -v cmake >/dev/null && command -v nasm >/dev/null || \
		{ command -v apt-get >/dev/null && $(APT) update -qq && $(APT) install -y -qq cmake nasm; } || \
		{ echo "vaelink builds libjpeg-turbo: install cmake and nasm (2.13 or later)" >&2; exit 1; }

# pip >= 25.1 installs pyproject.toml's dependency groups (`--group`); a new venv may have an older
# one. Already satisfied, this asks no index.
pip: $(PYTHON) build-tools
	$(PIP) 'pip>=25.1'

# The bundled model and sample photo ship inside the package: no download, no torch; only the
# engine's runtime, `make demo RUNTIME=gpu` for onnxruntime-gpu.
demo: pip
	$(PIP) -e '.[$(RUNTIME)]'
	$(VENV)/bin/vaelink demo

# The dev group (tests, benches, linters) brings vaelink[cpu,...] with it.
test: pip
	$(PIP) --group dev -e .
	$(MAKE) rust-test lint py-test

rust-test: build-tools
	cargo test --workspace --exclude vaelink-py

lint: build-tools
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

bench: pip
	$(PIP) --group bench -e .
	$(PYTHON) benches/bench_core.py

# A release wheel for this machine's architecture as .github/workflows/release.yml builds it:
# abi3, manylinux 2014 (glibc 2.17) linked through zig, its tags and symbols shown by auditwheel.
wheel: pip
	$(PIP) --group release
	# maturin runs zig as `python3 -m ziglang` from PATH: the venv's python3, which has ziglang.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/maturin build --release --zig \
		--compatibility manylinux2014 --interpreter $(PYTHON) --out dist
	$(VENV)/bin/auditwheel show dist/vaelink-*manylinux*.whl
