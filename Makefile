# ipcd: `make run` serves in the foreground, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

PY_DIRS := $(wildcard ipcd tests benchmarks examples)

.PHONY: install run test lint fmt bench soak clean

# Bytecode is compiled here because nothing else will write it: this machine
# sets PYTHONDONTWRITEBYTECODE=1, so every run would compile ipcd again
# (start-up time: docs/performance.md). Timestamp pyc are revalidated by
# mtime, so an edited module is still read fresh; `make install` (and so
# `make test`) compiles it again, which is instant when nothing changed.
COMPILE := $(BIN)/python -m compileall -q --invalidation-mode timestamp

install: $(STAMP)
	$(COMPILE) ipcd

# The editable install is a plain path entry in a .pth (compat mode) rather
# than setuptools' default import finder, which every start of the venv's
# Python pays for (~15 ms here); older or newer setuptools without compat
# mode get the default.
$(STAMP): pyproject.toml scripts/install-system-deps
	./scripts/install-system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat \
	    || $(BIN)/python -m pip install -q -e '.[dev]'
	$(COMPILE) $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
	touch $(STAMP)

run: install  # a development daemon: sockets in /tmp/ipcd, its history journal beside them
	$(BIN)/ipcd serve --state-dir /tmp/ipcd.state

lint: install
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install lint
	$(BIN)/pytest

fmt: install
	$(BIN)/ruff format $(PY_DIRS)
	$(BIN)/ruff check --fix $(PY_DIRS)

bench: install
	$(BIN)/python -m benchmarks

soak: install
	$(BIN)/pytest -m soak

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
