# Loupe: `make demo` and `make test` bootstrap .venv themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_LOG := $(VENV)/pip-install.log
# pip's own lines (build-backend warnings, this machine's absent local indexes) go to a log
PIP := $(PY) -m pip install -q -c constraints.txt
PIP_LOGGED = >> $(PIP_LOG) 2>&1 || { tail -n 30 $(PIP_LOG); echo "pip failed: see $(PIP_LOG)"; exit 1; }

# constraints.txt pins every resolved version, so each machine gets the same install
$(STAMP): pyproject.toml constraints.txt
	@echo "Installing Loupe's environment into $(VENV) (about 3 min; pip's output: $(PIP_LOG))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip $(PIP_LOGGED)
	@$(PIP) torch==2.13.0 $(PIP_LOGGED)
	@$(PIP) -e '.[cpu,dev,coco]' $(PIP_LOGGED)
	@touch $(STAMP)
	@echo "Environment ready."

venv: $(STAMP)

demo: venv
	$(VENV)/bin/loupe demo

# a folder of real photos, searchable with no logs or training (pretrained detector, frozen
# champion): CATALOG=DIR for yours, else the photos packages ship (make real-photos)
demo-photos: venv real-photos
	$(if $(CATALOG),,$(PY) bench/real_photos.py --folder data/real-photos > /dev/null)
	$(VENV)/bin/loupe demo --catalog $(or $(CATALOG),data/real-photos)

# the web demo test drives Debian's chromium; install it when we may (root + apt)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	       || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
	            apt-get install -y -q chromium >/dev/null; }; }; } \
	  || echo "chromium missing: tests/e2e/test_web_demo.py will fail (apt-get install chromium)"

# real photographs Debian packages ship (darknet, opencv-doc) -> .cache/real_photos
real-photos: venv
	$(PY) bench/real_photos.py > /dev/null

# ruff first: a lint error fails fast, before the multi-minute suites
test: lint browser real-photos
	$(PY) -m pytest -q --durations=25

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

# every benchmark on the large world -> reports/bench.json + bench.md (~30 min on 2 cores);
# BENCH_ARGS='--reuse index' keeps reports/bench_index.json (see bench/run.py)
bench: venv
	nice -n 10 $(PY) bench/run.py $(BENCH_ARGS)

# one shard at each size next to 75k: build, RSS, bytes/vector, recall, QPS/p99 at k=150
SCALE ?= 1M
bench-scale: venv
	nice -n 10 $(PY) bench/index.py --vectors $(SCALE)

# the real stack for SOAK_MINUTES under traffic, a growing feed, replica kills, a rollout, a
# rollback and a compaction -> reports/soak.json + soak.png (exit 1 when an invariant fails)
SOAK_MINUTES ?= 20
soak: venv
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

# the seed study as DVC experiments: one queued `dvc exp run evaluate -S train.seed=N` per seed, run
# one at a time (two cores), summarised from `dvc exp show` -> reports/seed_study.json
SEEDS ?= 0 1 2
seed-study: venv
	@for s in $(SEEDS); do $(VENV)/bin/dvc exp run --queue evaluate -S train.seed=$$s -n seed-$$s; done
	$(VENV)/bin/dvc exp run --run-all --jobs 1
	$(PY) bench/seed_study.py

# ruff is the static check; mypy is not run (85 errors in 24 files when last tried)
lint: venv
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf data/demo runs/demo
