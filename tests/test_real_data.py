"""The stage on the real beans photos: counts, labels and sizes match the input folders."""

from __future__ import annotations

import io
import os
from collections import Counter

import pytest
from PIL import Image

from tests.preprocess_helpers import SHARED, all_records, run_stage

RAW_SAMPLE = os.path.join(SHARED, "beans_raw_sample")
BEANS = os.path.join(SHARED, "beans")


def _files(root: str) -> dict[str, str]:
    """uri -> label (the folder above the file) for every file under root."""
    return {os.path.join(d, n): os.path.basename(d) for d, _, names in os.walk(root) for n in names}


def _check(summary: dict, run_dir: str, expected: dict[str, str], size: int) -> dict:
    records = all_records(run_dir)
    seen = {r["uri"]: r for rs in records.values() for r in rs}
    assert summary["dead_letter"]["count"] == 0
    assert set(seen) == set(expected)  # every input, once
    assert {uri: r["label_name"] for uri, r in seen.items()} == expected
    for r in list(seen.values())[:: max(1, len(seen) // 50)]:
        assert Image.open(io.BytesIO(r["image"])).size == (size, size)
    assert sorted(summary["classes"]) == ["angular_leaf_spot", "bean_rust", "healthy"]
    return records


@pytest.mark.skipif(not os.path.isdir(RAW_SAMPLE), reason=f"real data not found at {RAW_SAMPLE}")
def test_beans_raw_sample_full_size_originals(tmp_path):
    expected = _files(RAW_SAMPLE)
    assert len(expected) == 90
    summary = run_stage(RAW_SAMPLE, str(tmp_path), "model.image_size=96")
    records = _check(summary, str(tmp_path), expected, 96)
    assert summary["layout"] == "class_folders"
    assert sum(len(rs) for rs in records.values()) == 90
    assert all(summary["records"][s] > 0 for s in ("train", "eval", "test"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(BEANS), reason=f"real data not found at {BEANS}")
def test_beans_split_folders_on_two_workers(tmp_path):
    expected = _files(BEANS)
    assert len(expected) == 1295
    summary = run_stage(BEANS, str(tmp_path), "model.image_size=128", "preprocess.num_workers=2")
    records = _check(summary, str(tmp_path), expected, 128)
    assert summary["layout"] == "split_folders"
    assert summary["records"]["test"] == 128
    assert summary["records"]["train"] + summary["records"]["eval"] == 1167
    assert summary["per_class"]["test"] == {"angular_leaf_spot": 43, "bean_rust": 43, "healthy": 42}
    assert 0.08 < summary["records"]["eval"] / 1167 < 0.15  # eval carved from train: 0.1 / 0.9
    assert all("/test/" in r["uri"] for r in records["test"])
    assert not any("/test/" in r["uri"] for r in records["train"] + records["eval"])
    assert Counter(r["label"] for r in records["train"]).keys() == {0, 1, 2}
