"""The stage on the real beans photos: counts, labels and sizes match the input folders.
(The 1,295-photo split-folder set on two workers is checked on the preprocessing that
``finetune run`` does in test_evaluate_real.py.)"""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from tests.preprocess_helpers import SHARED, all_records, run_stage

RAW_SAMPLE = os.path.join(SHARED, "beans_raw_sample")


def files_and_labels(root: str) -> dict[str, str]:
    """uri -> label (the folder above the file) for every file under root."""
    return {os.path.join(d, n): os.path.basename(d) for d, _, names in os.walk(root) for n in names}


def check_all_inputs(summary: dict, run_dir: str, expected: dict[str, str], size: int) -> dict:
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
    expected = files_and_labels(RAW_SAMPLE)
    assert len(expected) == 90
    summary = run_stage(RAW_SAMPLE, str(tmp_path), "model.image_size=96")
    records = check_all_inputs(summary, str(tmp_path), expected, 96)
    assert summary["layout"] == "class_folders"
    assert sum(len(rs) for rs in records.values()) == 90
    assert all(summary["records"][s] > 0 for s in ("train", "eval", "test"))
