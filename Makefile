# make train: install what training needs into .venv (if needed) and train the default config
#             on the embedded corpus.
# make test:  add the test extras to .venv (if needed) and run the whole test suite on CPU
#             (8 simulated devices), in TEST_WORKERS processes, one test file per worker at a
#             time (files share their trained runs); TEST_WORKERS=0 runs it in this process.
PYTHON ?= python3
VENV := .venv
TRAIN_STAMP := $(VENV)/.installed-train
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= configs/default.py
WORKDIR ?= runs/default
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: install train test clean

install: $(TRAIN_STAMP)

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "moe_jax needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

$(TRAIN_STAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e .
	@touch $@

$(TEST_STAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $@ $(TRAIN_STAMP)

train: $(TRAIN_STAMP)
	$(VENV)/bin/python -m moe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(TEST_STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/python -m pytest -q \
	  -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs *.egg-info
