# Loupe: `make demo` and `make test` bootstrap .venv themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# this machine's pip config names local indexes that may be absent: keep their noise out
PIP_QUIET := 2> >(grep -v "is ignored: it is neither" >&2)

.PHONY: venv browser demo test test-fast bench lint clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	$(PY) -m pip install -q torch==2.13.0 $(PIP_QUIET)
	$(PY) -m pip install -q -e '.[dev]' $(PIP_QUIET)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/loupe demo

# the web demo test drives Debian's chromium; install it when we may (root + apt)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	       || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
	            apt-get install -y -q chromium >/dev/null; }; }; } \
	  || echo "chromium missing: tests/e2e/test_web_demo.py will fail (apt-get install chromium)"

test: venv browser
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# every benchmark on the large world -> reports/bench.json + bench.md (~30 min on 2 cores);
# BENCH_ARGS='--reuse index' keeps reports/bench_index.json (see bench/run.py)
bench: venv
	nice -n 10 $(PY) bench/run.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf data/demo runs/demo
