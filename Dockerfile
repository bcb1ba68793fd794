# The finetune image: the package installed from the pinned constraints.txt, entry point `finetune`.
#
#   make image                  # CPU, with docker, podman or buildah (whichever is installed)
#   make image VARIANT=gpu      # NVIDIA GPUs
#
# or by hand, with any of the three (podman and buildah need no daemon):
#
#   docker build -t finetune:0.1.0 .                               # CPU
#   docker build --build-arg VARIANT=gpu -t finetune:0.1.0-gpu .   # NVIDIA GPUs
#   podman build -t finetune:0.1.0 .
#   buildah build -t finetune:0.1.0 .
#
# The GPU variant adds TensorFlow's CUDA libraries (tensorflow[and-cuda], from pip); the node
# provides the NVIDIA driver. No credentials go into the image: pods get them from the cluster
# (Workload Identity, or a mounted key Secret; see k8s/README.md). The source stays in /app, so
# a Dataflow preprocessing run can ship it with pipeline_options {setup_file: /app/setup.py}.
#
# The pods run it as user 1000 on a read-only root file system with an emptyDir at /tmp, which is
# why Matplotlib's cache goes there. `make test-image` builds it and runs the rendered pods in it
# (docs/container-image.md: sizes, build times, how the test works).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
RUN case "$VARIANT" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 1;; esac
WORKDIR /app
COPY setup.py constraints.txt README.md LICENSE ./
COPY pipeline ./pipeline
COPY components ./components
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt . \
 && if [ "$VARIANT" = gpu ]; then \
      /opt/venv/bin/pip install --no-cache-dir -c constraints.txt "tensorflow[and-cuda]==2.21.*"; \
    fi

FROM ${PYTHON_IMAGE}
# The user the pods run as (runAsUser in the rendered manifests: pipeline/cluster/manifests.py).
RUN groupadd --gid 1000 finetune \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/finetune finetune
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 1000:1000
WORKDIR /home/finetune
ENTRYPOINT ["finetune"]
CMD ["--help"]
