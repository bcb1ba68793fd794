# The two commands in the README: `make demo` (the main job on the bundled default data)
# and `make test`. Everything installs into .venv from the pinned constraints.txt.
# `make image` builds the container image; `make test-image` builds it with podman and runs
# the rendered pods in it (tests/test_image.py).
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
BENCH_WEIGHTS_1 ?= ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
RUN_DIR ?= runs/beans
# ImageNet MobileNetV2 0.35 weights: the offline copy in ../shared when present, otherwise
# Keras downloads them ("imagenet").
SHARED_WEIGHTS := ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5
WEIGHTS ?= $(if $(wildcard $(SHARED_WEIGHTS)),$(SHARED_WEIGHTS),imagenet)
PYTEST_ARGS ?=
# The image: docker when its engine answers, else podman, else buildah (both daemonless).
VARIANT ?= cpu
# Extra build flags, e.g. IMAGE_BUILD_ARGS="--isolation chroot" for podman inside a container.
IMAGE_BUILD_ARGS ?=
IMAGE ?= finetune:0.1.0$(if $(filter gpu,$(VARIANT)),-gpu)
CONTAINER_TOOL ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null; then echo podman; elif command -v buildah >/dev/null; then echo buildah; fi)

.PHONY: install test test-fast test-image image demo lint bench bench-gpu k8s clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,lint]'
	touch $@

test: install
	$(PY) -m pytest tests -m "not image" $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not slow and not image" $(PYTEST_ARGS)

# Builds the image with podman on a Debian base made by mmdebstrap, then runs the rendered
# pods in it (skipped, with the reason, where podman or mmdebstrap is missing).
test-image: install
	$(PY) -m pytest tests -m image $(PYTEST_ARGS)

image:
	@test -n "$(CONTAINER_TOOL)" || { echo "no docker engine, podman or buildah found" >&2; exit 1; }
	$(CONTAINER_TOOL) build $(IMAGE_BUILD_ARGS) --build-arg VARIANT=$(VARIANT) -t $(IMAGE) .

demo: install
	$(VENV)/bin/finetune run --config configs/beans.yaml \
		--set data.source=$(DATA) --set run_dir=$(RUN_DIR) --set model.weights=$(WEIGHTS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports  # the layers in pyproject.toml: pipeline -> components -> components.core

# Each benchmark runs as a module from the repository root (`python -m benchmarks.<name> --help`
# for its options) and writes its JSON result under runs/bench/ (--out) as well as printing it.
bench: install
	$(PY) -m benchmarks.bench_preprocess --data $(BENCH_DATA)
	$(PY) -m benchmarks.bench_train --beans $(BENCH_BEANS) --weights $(BENCH_WEIGHTS)
	$(PY) -m benchmarks.bench_cpu_kernels --beans $(BENCH_BEANS) --weights $(BENCH_WEIGHTS)
	$(PY) -m benchmarks.bench_cpu_precision
	$(PY) -m benchmarks.bench_scale --data $(BENCH_DATA)
	$(PY) -m benchmarks.bench_predict --data $(BENCH_DATA) --weights $(BENCH_WEIGHTS)
	$(PY) -m benchmarks.bench_decode --data $(BENCH_DATA)

# On a machine with a GPU only (it exits 2 where TensorFlow sees none; `--smoke` runs it on a
# CPU, as tests/test_bench_gpu.py does): docs/performance.md#gpu.
bench-gpu: install
	$(PY) -m benchmarks.bench_gpu --beans $(BENCH_BEANS) --weights $(BENCH_WEIGHTS_1)

# k8s/ is generated: regenerate it after changing configs/beans-cluster.yaml or the manifests
# code (tests/test_k8s_render.py fails when the two differ).
k8s: install
	$(VENV)/bin/finetune render --config configs/beans-cluster.yaml --schedule '0 2 * * *' --kustomize k8s

clean:
	rm -rf runs .pytest_cache .ruff_cache *.egg-info
