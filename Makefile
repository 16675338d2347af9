# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Tests and the demo read MNIST from ../shared/data/mnist when it is there; elsewhere l2cluster downloads it.
DATA   ?= $(wildcard ../shared/data/mnist)
DATA_ARG := $(if $(DATA),--data-dir $(DATA),)
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/l2cluster run jobs/quickstart.yaml $(DATA_ARG)

test: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check l2cluster plugins tests bench

bench: $(STAMP)
	$(PY) bench/reference_vs_l2cluster.py $(DATA_ARG)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
