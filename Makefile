# Every target bootstraps .venv from nothing and installs only the extras it uses,
# so a fresh clone needs only python3 and make (and apt, for Chromium, in `make test`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet
SPHINX := $(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html

.PHONY: demo test test-fast docs gallery docs-data bench bench-folding dist lint chromium clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per set of extras: `make demo` never installs torch or Sphinx.
$(VENV)/.installed-%: $(PY) pyproject.toml
	$(PIP) -e '.[$(subst +,$(comma),$*)]'
	touch $@

comma := ,

demo: $(VENV)/.installed-examples
	$(PY) examples/figure1.py

# The docs test opens the built site in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  { echo "installing chromium (apt) for the docs browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
	    || echo "could not install chromium: the browser test will be skipped"; }

test: $(VENV)/.installed-test+docs+build chromium
	$(PY) -m pytest -q -n 2 tests

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 -m "not slow" tests

docs: $(VENV)/.installed-docs
	$(SPHINX)
	@echo "open docs/_build/html/index.html"

# Reruns every example in full and copies what it wrote into the docs (the gallery's plots and numbers).
GALLERY := figure1 learning_rates batch_size flax_cnn data_parallel
gallery: $(VENV)/.installed-examples
	mkdir -p results docs/_data/examples
	for e in $(GALLERY); do $(PY) examples/$$e.py --out results || exit 1; \
	  cp results/$$e.json results/$$e.png docs/_data/examples/; done

docs-data: $(VENV)/.installed-bench
	$(PY) benchmarks/flax_parity.py > docs/_data/flax_parity.txt

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/bench.py

bench-folding: $(VENV)/.installed-bench
	$(PY) benchmarks/folding.py --out benchmarks/folding.json

dist: $(VENV)/.installed-build
	rm -rf dist
	$(PY) -m build --outdir dist

lint: $(PY)
	$(PIP) ruff
	$(VENV)/bin/ruff check jaxnorm tests examples benchmarks docs

clean:
	rm -rf $(VENV) results .pytest_cache docs/_build docs/api docs/gallery docs/_generated dist build
