# p2pnode: `make run` starts a local swarm of 4 real daemons; `make test` runs every check and test.
# Both create their own virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0; on a machine without a local wheel pip downloads it from PyPI.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Pinned versions of every dependency (what the tests were last green with); empty installs the newest.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install run sim test test-fast test-random test-latest lint protos check-protos bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/p2pnode swarm --nodes 4 --rounds 30

sim: install
	$(VENV)/bin/p2pnode sim --nodes 64 --task digits-mlp --topology gossip --rule mean --rounds 40 --seed 1 \
		--out results.json --plot curve.png

lint: install
	$(VENV)/bin/ruff check p2pnode simulator tests benchmarks experiments
	$(VENV)/bin/mypy

check-protos: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/check_protos.sh

protos: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/gen_protos.sh

test: lint check-protos
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The unit layer (tests/unit/: pure math, codecs, tasks, the in-memory seams), in under 60 s.
test-fast: install
	$(VENV)/bin/pytest -q -m "unit and not slow and not network" $(PYTEST_ARGS)

# The fast tests (no real swarm, no real network) in a shuffled order: RANDOM_SEED=N repeats one order.
RANDOM_SEED ?= $(shell date +%s)
test-random: install
	$(VENV)/bin/pytest -q -m "not slow and not network" --random-order-bucket=global \
		--random-order-seed=$(RANDOM_SEED) $(PYTEST_ARGS)

# The newest release of every dependency, in a venv of its own: shows a release that breaks us before the
# pins in constraints.txt are moved (run it on a schedule, not on every change).
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

bench: install
	$(PY) benchmarks/aggregators.py
	$(PY) benchmarks/transport.py

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .mypy_cache .ruff_cache
