"""Beam TestPipeline tests of the composite transforms (no I/O)."""

import hashlib
import io

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from components.preprocess import transforms


def _jpeg(seed: int, size=(48, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def test_decode_and_validate_routes_bad_records_with_reasons():
    records = [
        {"uri": "a.jpg", "label": "cat", "split": "", "data": _jpeg(1)},
        {"uri": "b.jpg", "label": "cat", "split": "test", "data": b""},
        {"uri": "c.jpg", "label": "", "split": "", "data": _jpeg(2)},
        {"uri": "d.jpg", "label": "dog", "split": "", "data": b"not an image"},
        {"uri": "e.jpg", "label": "dog", "split": "", "data": _jpeg(3, (10, 10))},
    ]
    with TestPipeline() as p:
        result = p | beam.Create(records) | transforms.DecodeAndValidate(size=32, min_size=16)
        assert_that(
            result.examples
            | beam.Map(lambda ex: (ex["uri"], ex["label"], ex["sha256"], len(ex["pixel_mean"]))),
            equal_to([("a.jpg", "cat", hashlib.sha256(records[0]["data"]).hexdigest(), 3)]),
            label="examples",
        )
        assert_that(
            result.dead_letter | beam.Map(lambda d: (d["uri"], d["stage"], d["reason"])),
            equal_to(
                [
                    ("b.jpg", "DecodeAndValidate", "empty_file"),
                    ("c.jpg", "DecodeAndValidate", "missing_label"),
                    ("d.jpg", "DecodeAndValidate", "not_an_image"),
                    ("e.jpg", "DecodeAndValidate", "too_small"),
                ]
            ),
            label="dead_letters",
        )


def _example(uri, label, split, sha):
    return {"uri": uri, "label": label, "split": split, "sha256": sha}


def test_deduplicate_keeps_the_test_copy_and_reports_leakage_and_conflicts():
    examples = [
        _example("train/cat/1.jpg", "cat", "train", "h1"),
        _example("test/cat/1.jpg", "cat", "test", "h1"),
        _example("train/cat/2.jpg", "cat", "train", "h2"),
        _example("train/dog/2.jpg", "dog", "train", "h2"),
        _example("train/dog/3.jpg", "dog", "train", "h3"),
    ]
    with TestPipeline() as p:
        result = p | beam.Create(examples) | transforms.Deduplicate()
        assert_that(
            result.examples | beam.Map(lambda ex: ex["uri"]),
            equal_to(["test/cat/1.jpg", "train/cat/2.jpg", "train/dog/3.jpg"]),
            label="kept",
        )
        assert_that(
            result.duplicate
            | beam.Map(lambda d: (d["uri"], d["duplicate_of"], d["cross_split"], d["conflicting_label"])),
            equal_to(
                [
                    ("train/cat/1.jpg", "test/cat/1.jpg", True, False),
                    ("train/dog/2.jpg", "train/cat/2.jpg", False, True),
                ]
            ),
            label="duplicates",
        )


def test_assign_splits_then_split_by_partitions_every_example_once():
    examples = [
        _example(f"{i}.jpg", "x", "", hashlib.sha256(str(i).encode()).hexdigest()) for i in range(300)
    ]
    examples.append(_example("given.jpg", "x", "test", "h"))
    with TestPipeline() as p:
        parts = (
            p
            | beam.Create(examples)
            | transforms.AssignSplits(0.6, 0.2, 0.2, source_has_eval=False)
            | transforms.SplitBy()
        )
        counts = [part | f"Count{i}" >> beam.combiners.Count.Globally() for i, part in enumerate(parts)]
        total = counts | beam.Flatten() | beam.CombineGlobally(sum)
        assert_that(total, equal_to([301]), label="total")
        for i, (part, low, high) in enumerate(zip(parts, (150, 40, 40), (210, 80, 81), strict=True)):
            assert_that(
                part
                | f"InRange{i}" >> beam.combiners.Count.Globally()
                | f"Check{i}" >> beam.Map(lambda n, lo=low, hi=high: lo <= n <= hi),
                equal_to([True]),
                label=f"range{i}",
            )
        assert_that(
            parts[2] | beam.Filter(lambda ex: ex["uri"] == "given.jpg") | beam.Map(lambda ex: ex["split"]),
            equal_to(["test"]),
            label="given",
        )
