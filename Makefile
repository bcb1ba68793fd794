# The two commands in the README: `make demo` (the main job on the bundled default data)
# and `make test`. Everything installs into .venv from the pinned constraints.txt.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The bundled beans copy in ../shared when present; otherwise data/beans, which the first run
# fills from data.download in configs/beans.yaml.
SHARED_DATA := ../shared/datasets/beans
DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),data/beans)
BENCH_DATA ?= ../shared/datasets/beans_raw_sample
BENCH_BEANS ?= ../shared/datasets/beans
BENCH_WEIGHTS ?= ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5
RUN_DIR ?= runs/beans
# ImageNet MobileNetV2 0.35 weights: the offline copy in ../shared when present, otherwise
# Keras downloads them ("imagenet").
SHARED_WEIGHTS := ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5
WEIGHTS ?= $(if $(wildcard $(SHARED_WEIGHTS)),$(SHARED_WEIGHTS),imagenet)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo lint bench k8s clean

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
	$(VENV)/bin/finetune run --config configs/beans.yaml \
		--set data.source=$(DATA) --set run_dir=$(RUN_DIR) --set model.weights=$(WEIGHTS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/bench_preprocess.py --data $(BENCH_DATA)
	$(PY) benchmarks/bench_train.py --beans $(BENCH_BEANS) --weights $(BENCH_WEIGHTS)
	$(PY) benchmarks/bench_cpu_kernels.py --beans $(BENCH_BEANS) --weights $(BENCH_WEIGHTS)

# k8s/ is generated: regenerate it after changing configs/beans-cluster.yaml or the manifests
# code (tests/test_k8s_render.py fails when the two differ).
k8s: install
	$(VENV)/bin/finetune render --config configs/beans-cluster.yaml --schedule '0 2 * * *' --kustomize k8s

clean:
	rm -rf runs .pytest_cache .ruff_cache *.egg-info
