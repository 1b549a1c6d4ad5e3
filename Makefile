# make train: install into .venv (if needed) and train the default config on the embedded corpus.
# make test:  install into .venv (if needed) and run the whole test suite on CPU (8 simulated devices).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/default.py
WORKDIR ?= runs/default
PYTEST_ARGS ?=

.PHONY: install train test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "moe_jax needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python -m moe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs *.egg-info
