# popguard developer entry points.  `make run` and `make test` are all a
# newcomer needs; both create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test check lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The proxy in front of the bundled demo upstream, on loopback.
run: $(STAMP)
	$(BIN)/popguard demo

lint: $(STAMP)
	$(BIN)/ruff check popguard tests bench
	$(BIN)/ruff format --check popguard tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

# Everything: lint, types, then the whole test suite (core, shell and
# integration against real Dovecot and real clients).
test: check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/core tests/shell $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
