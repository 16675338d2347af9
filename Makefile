# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
# Tests and the demo read MNIST from ../shared/data/mnist when it is there; elsewhere l2cluster downloads it.
DATA   ?= $(wildcard ../shared/data/mnist)
DATA_ARG := $(if $(DATA),--data-dir $(DATA),)
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make bench-compare: two git revisions, same run, same machine; WORKTREE is the working tree as it is now.
BEFORE ?= HEAD
AFTER  ?= WORKTREE
# The image (deploy/Dockerfile) is tagged with l2cluster's version and the Ray pinned in pyproject.toml.
VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/^ *"ray\(\[[a-z,]*\]\)\{0,1\}==\([0-9.]*\)".*/\2/p' pyproject.toml)
IMAGE       ?= l2cluster:$(VERSION)-ray$(RAY_VERSION)

.PHONY: install demo test test-all lint bench bench-sweep bench-compare docker clean

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
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/reference_vs_l2cluster.py $(DATA_ARG)

# The same sweep on Ray Tune (two loops) and on l2cluster (unpacked, packed); needs the `bench` extra (Ray Tune).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-sweep: $(BENCH_STAMP)
	$(PY) bench/sweep_throughput.py $(DATA_ARG) $(BENCH_ARGS)

# Each revision's own reference and sweep benchmarks from a temporary worktree, rounds interleaved (no Ray Tune needed).
bench-compare: $(STAMP)
	$(PY) bench/compare_revisions.py $(BEFORE) $(AFTER) $(DATA_ARG) $(BENCH_ARGS)

# Needs Docker (not available on the development machines): see deploy/README.md.
docker:
	docker build -f deploy/Dockerfile --build-arg RAY_VERSION=$(RAY_VERSION) -t $(IMAGE) .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
