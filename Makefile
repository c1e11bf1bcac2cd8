# `make certify` and `make test` work on a fresh machine: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
MODEL ?= models/mnist-input-consistency-s1.0
IMAGE ?= examples/mnist-7-0000.png

.PHONY: install certify test test-fast lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

certify: $(STAMP)
	$(VENV)/bin/splitz certify $(IMAGE) --model $(MODEL)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"
