"""The stage with gs:// input and output, against a GCS server on loopback."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

from components.core import storage
from tests.image_fixtures import make_odd_and_bad
from tests.preprocess_helpers import PUBLISHED, all_records, out, read_jsonl, run_stage

pytestmark = pytest.mark.gcs


def _upload(local_root: str, prefix: str) -> None:
    for dirpath, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(prefix, os.path.relpath(path, local_root)), f.read())


def test_gcs_source_and_run_dir_on_two_workers(tmp_path, gcs_prefix):
    expected = make_odd_and_bad(str(tmp_path / "src"))
    source, run_dir = storage.join(gcs_prefix, "images"), storage.join(gcs_prefix, "runs", "r1")
    _upload(str(tmp_path / "src"), source)

    summary = run_stage(source, run_dir, "preprocess.max_bad_fraction=1.0", "preprocess.num_workers=2")

    records = all_records(run_dir)
    recorded = {r["uri"] for rs in records.values() for r in rs}
    assert recorded == {storage.join(source, rel) for rel, reason in expected.items() if reason is None}
    for r in records["train"]:
        assert Image.open(io.BytesIO(r["image"])).size == (64, 64)
    dead = {d["uri"]: d["reason"] for d in read_jsonl(out(run_dir, "dead_letter.jsonl"))}
    assert dead == {storage.join(source, rel): reason for rel, reason in expected.items() if reason}
    assert json.loads(storage.read_text(out(run_dir, "summary.json"))) == summary
    vocabulary = storage.read_text(out(run_dir, "transform_fn", "assets", "label")).split()
    assert vocabulary == summary["classes"] and sorted(vocabulary) == ["alpha", "beta"]
    assert storage.exists(out(run_dir, "transform_fn", "saved_model.pb"))
    # Only the published outputs remain: no staging prefix, no Beam temporary files.
    leftovers = {f.uri[len(run_dir) + 1 :].split("/")[0] for f in storage.list_files(run_dir)}
    assert leftovers == {"preprocess"}
    top = {f.uri[len(out(run_dir)) + 1 :].split("/")[0] for f in storage.list_files(out(run_dir))}
    assert top == PUBLISHED


def test_gcs_manifest_with_relative_uris(tmp_path, gcs_prefix):
    expected = make_odd_and_bad(str(tmp_path / "src"))
    _upload(str(tmp_path / "src"), storage.join(gcs_prefix, "data"))
    valid = sorted(rel for rel, reason in expected.items() if reason is None)
    rows = "".join(f"data/{rel},{rel.split('/')[0]}\n" for rel in valid)
    storage.write_text(storage.join(gcs_prefix, "manifest.csv"), "uri,label\n" + rows)
    run_dir = str(tmp_path / "run")  # gs:// input, local output

    summary = run_stage(storage.join(gcs_prefix, "manifest.csv"), run_dir)

    assert summary["layout"] == "manifest" and summary["dead_letter"]["count"] == 0
    assert sum(summary["records"].values()) == len(valid)
