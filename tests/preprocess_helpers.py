"""Helpers for tests that run the preprocessing stage and read back what it wrote."""

from __future__ import annotations

import json
import os
import tempfile

import tensorflow as tf

from components.config import load_config
from components.core import storage
from components.preprocess import stage
from components.preprocess.schema import parse_example
from components.preprocess.splits import SPLITS

SHARED = os.environ.get("FINETUNE_DATASETS") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "datasets"
)
# Everything a successful run publishes under <run_dir>/preprocess/.
PUBLISHED = {
    *SPLITS,
    "transform_fn",
    "transformed_metadata",
    "dead_letter.jsonl",
    "duplicates.jsonl",
    "summary.json",
    "config.yaml",
    ".finetune-stage.json",  # which stage made the folder and every file it wrote
}


def config_for(source: str, run_dir: str, *overrides: str):
    """A config with test-friendly defaults: small images, one local worker."""
    return load_config(
        None,
        [
            f"data.source={source}",
            f"run_dir={run_dir}",
            "model.image_size=64",
            "preprocess.num_workers=1",
            *overrides,
        ],
    )


def run_stage(source: str, run_dir: str, *overrides: str) -> dict:
    return stage.run(config_for(source, run_dir, *overrides))


def out(run_dir: str, *parts: str) -> str:
    return storage.join(run_dir, "preprocess", *parts)


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def read_records(run_dir: str, split: str) -> list[dict]:
    """Every record of one split, parsed with the shared schema (works for gs:// too)."""
    files = [f.uri for f in storage.list_files(out(run_dir, split))]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        local = []
        for i, uri in enumerate(files):
            path = os.path.join(tmp, f"{i}.tfrecord")
            with open(path, "wb") as f:
                f.write(storage.read_bytes(uri))
            local.append(path)
        for serialized in tf.data.TFRecordDataset(local):
            parsed = parse_example(serialized)
            records.append(
                {
                    "image": parsed["image"].numpy(),
                    "label": int(parsed["label"]),
                    "label_name": parsed["label_name"].numpy().decode(),
                    "uri": parsed["uri"].numpy().decode(),
                }
            )
    return records


def all_records(run_dir: str) -> dict[str, list[dict]]:
    return {s: read_records(run_dir, s) for s in SPLITS}
