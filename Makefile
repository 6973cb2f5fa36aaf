# Every target bootstraps .venv from nothing, so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint figures clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,examples,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/figure1.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) benchmarks/bench.py

figures: $(STAMP)
	$(PY) examples/figure1.py
	$(PY) examples/batch_size.py
	mkdir -p docs
	cp results/figure1.png results/batch_size.png docs/

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check jaxnorm tests examples benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache
