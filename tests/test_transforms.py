"""Beam TestPipeline tests of the composite transforms (no I/O)."""

import hashlib
import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from components.preprocess import transforms
from components.preprocess.sources import Candidate


def _jpeg(seed: int, size=(48, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize("threads, more", [(2, 40), (2, 3), (1, 40)])
def test_read_and_decode_routes_bad_candidates_with_reasons_on_threads(threads, more):
    # 47 candidates: two batches (on threads, the first is emitted when the second is handed
    # over, the last at the end of the bundle); 10: one batch, emitted at the end.
    files = {
        "a.jpg": _jpeg(1),
        "b.jpg": b"",
        "c.jpg": _jpeg(2),
        "d.jpg": b"not an image",
        "e.jpg": _jpeg(3, (10, 10)),
        **{f"ok{i}.jpg": _jpeg(10 + i) for i in range(more)},
    }
    candidates = [
        Candidate("a.jpg", "cat", id=0),
        Candidate("b.jpg", "cat", "test", id=1),
        Candidate("c.jpg", "", id=2),
        Candidate("d.jpg", "dog", id=3),
        Candidate("e.jpg", "dog", id=4),
        Candidate("gone.jpg", "dog", id=5),  # the reader raises: unreadable
        Candidate("x.csv#7", "", problem="bad_manifest_row", detail="no uri", id=6),
        *(Candidate(f"ok{i}.jpg", "cat", id=7 + i) for i in range(more)),
    ]
    with TestPipeline() as p:
        result = (
            p
            | beam.Create(candidates)
            | transforms.ReadAndDecode(files.__getitem__, size=32, min_size=16, threads=threads)
        )
        assert_that(
            result.examples
            | beam.Map(lambda ex: (ex["uri"], ex["label"], ex["sha256"], len(ex["pixel_mean"]))),
            equal_to(
                [
                    (uri, "cat", hashlib.sha256(files[uri]).hexdigest(), 3)
                    for uri in ["a.jpg", *(f"ok{i}.jpg" for i in range(more))]
                ]
            ),
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
                    ("gone.jpg", "ReadImages", "unreadable"),
                    ("x.csv#7", "ListImages", "bad_manifest_row"),
                ]
            ),
            label="dead_letters",
        )


def _example(uri, label, split, sha, id_=0):
    return {
        "id": id_,
        "uri": uri,
        "label": label,
        "split": split,
        "sha256": sha,
        "pixel_mean": [1.0, 2.0, 3.0],
        "pixel_sq_mean": [1.0, 4.0, 9.0],
        "image": b"jpeg",
    }


def test_deduplicate_keeps_the_test_copy_and_reports_leakage_and_conflicts():
    examples = [
        _example("train/cat/1.jpg", "cat", "train", "h1", 0),
        _example("test/cat/1.jpg", "cat", "test", "h1", 1),
        _example("train/cat/2.jpg", "cat", "train", "h2", 2),
        _example("train/dog/2.jpg", "dog", "train", "h2", 3),
        _example("train/dog/3.jpg", "dog", "train", "h3", 4),
        _example("train/dog/3.jpg", "dog", "train", "h3", 5),  # one file named twice in a manifest
    ]
    with TestPipeline() as p:
        result = p | beam.Create(examples) | transforms.Deduplicate()
        assert_that(
            result.examples | beam.Map(lambda ex: (ex["id"], ex["uri"], "image" in ex)),
            equal_to(
                [(1, "test/cat/1.jpg", False), (2, "train/cat/2.jpg", False), (4, "train/dog/3.jpg", False)]
            ),
            label="kept",
        )
        assert_that(
            result.duplicate
            | beam.Map(
                lambda d: (d["id"], d["uri"], d["duplicate_of"], d["cross_split"], d["conflicting_label"])
            ),
            equal_to(
                [
                    (0, "train/cat/1.jpg", "test/cat/1.jpg", True, False),
                    (3, "train/dog/2.jpg", "train/cat/2.jpg", False, True),
                    (5, "train/dog/3.jpg", "train/dog/3.jpg", False, False),
                ]
            ),
            label="duplicates",
        )


def test_assign_splits_keeps_given_splits_and_follows_the_fractions():
    examples = [
        _example(f"{i}.jpg", "x", "", hashlib.sha256(str(i).encode()).hexdigest()) for i in range(300)
    ]
    examples.append(_example("given.jpg", "x", "test", "h"))
    with TestPipeline() as p:
        splits = p | beam.Create(examples) | transforms.AssignSplits(0.6, 0.2, 0.2, source_has_eval=False)
        counts = splits | beam.Map(lambda ex: ex["split"]) | beam.combiners.Count.PerElement()
        assert_that(
            counts | beam.Map(lambda kv: (kv[0], {"train": 150, "eval": 40, "test": 40}[kv[0]] <= kv[1])),
            equal_to([("train", True), ("eval", True), ("test", True)]),
            label="fractions",
        )
        assert_that(
            splits | beam.Filter(lambda ex: ex["uri"] == "given.jpg") | beam.Map(lambda ex: ex["split"]),
            equal_to(["test"]),
            label="given",
        )
