# The two commands in the README: `make demo` (the main job on the bundled default data)
# and `make test`. Everything installs into .venv from the pinned constraints.txt.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/datasets/beans
BENCH_DATA ?= ../shared/datasets/beans_raw_sample
RUN_DIR ?= runs/beans
PYTEST_ARGS ?=

.PHONY: install test test-fast demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,lint]'
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/finetune preprocess --config configs/beans.yaml \
		--set data.source=$(DATA) --set run_dir=$(RUN_DIR)
	@cat $(RUN_DIR)/preprocess/summary.json

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/bench_preprocess.py --data $(BENCH_DATA)

clean:
	rm -rf runs .pytest_cache .ruff_cache *.egg-info
