"""The preprocessing graph's shard writing: examples reach their TFRecord shards through spill
files, on local and on gs:// storage (the scratch space of a remote runner)."""

from __future__ import annotations

import hashlib
import struct

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from components.core import storage
from components.core.storage import join
from components.preprocess import pipeline as graph
from components.preprocess import schema
from components.preprocess.splits import SPLITS


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_prefix")


def _example(i: int, split: str, label: str) -> dict:
    image = f"jpeg-bytes-{i}".encode() * 500
    return {
        "id": i,
        "uri": f"/data/{label}/{i}.jpg",
        "label": label,
        "split": split,
        "sha256": hashlib.sha256(image).hexdigest(),
        "image": image,
        "pixel_mean": [1.0, 2.0, 3.0],
        "pixel_sq_mean": [1.0, 4.0, 9.0],
    }


def _records(uri: str) -> list[bytes]:
    """The records of a TFRecord file, read by hand (TensorFlow cannot reach the emulator)."""
    data, out, offset = storage.read_bytes(uri), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        out.append(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
    return out


SHARDS = {"train": 3, "eval": 2, "test": 1}  # files per split: each split has its own count


def _shards_as_written(output_dir: str):
    """A matcher: one ``(("shard", "<split>/<file>", sha256), bytes)`` fact per shard file,
    every split's, with the size and SHA-256 of the file on disk."""

    def match(facts) -> None:
        expected = {}
        for split in SPLITS:
            for index in range(SHARDS[split]):
                name = f"{split}/{schema.shard_name(index, SHARDS[split])}"
                data = storage.read_bytes(join(output_dir, name))
                expected[name] = (hashlib.sha256(data).hexdigest(), len(data))
        assert {name: (sha, size) for (_, name, sha), size in facts} == expected
        assert len(facts) == len(expected)  # one fact per shard: summed per key, never twice

    return match


@pytest.mark.parametrize(
    ("open_bytes", "sort_bytes"),
    [
        (graph.SPILL_OPEN_BYTES, 64 * 2**20),  # every shard sorted in memory
        (20_000, 20_000),  # a spill file per ~3 images; a sorted run on disk per ~3 records
    ],
)
def test_examples_reach_their_shards_through_spill_files(
    root: str, open_bytes: int, sort_bytes: int, monkeypatch
) -> None:
    monkeypatch.setattr(graph, "SPILL_OPEN_BYTES", open_bytes)
    examples = [_example(i, "train" if i < 30 else "eval", ("cat", "dog")[i % 2]) for i in range(40)]
    examples.append(_example(40, "eval", "zebra"))  # no train image has this label
    plan = graph.Plan(
        candidates_uri="",
        output_dir=join(root, "out"),
        spill_dir=join(root, "spill"),
        transform_fn_dir="",
        image_size=32,
        min_image_size=1,
        jpeg_quality=95,
        max_file_bytes=2**20,
        max_decoded_bytes=2**26,
        image_threads=1,
        shards=SHARDS,
        sort_bytes=sort_bytes,
        split_fractions=(0.8, 0.1, 0.1),
        source_has_eval=True,
    )
    with TestPipeline() as p:
        written, empty = graph._write_records(
            p | "Examples" >> beam.Create(examples),
            plan,
            beam.pvalue.AsList(p | "Dropped" >> beam.Create([3, 31])),  # Deduplicate's dropped copies
            beam.pvalue.AsSingleton(p | "Vocabulary" >> beam.Create([["dog", "cat"]])),
        )
        assert_that(
            written.dead_letter | beam.Map(lambda d: (d["uri"], d["split"], d["stage"], d["reason"])),
            equal_to([("/data/zebra/40.jpg", "eval", "ApplyVocabulary", "label_not_in_train")]),
            label="DeadLetters",
        )
        shard_facts = (written.records, empty) | beam.Flatten() | beam.Filter(lambda f: f[0][0] == "shard")
        assert_that(shard_facts, _shards_as_written(join(root, "out")), label="ShardDigests")
        assert_that(
            written.records | beam.Filter(lambda f: f[0][0] == "record") | beam.CombinePerKey(sum),
            equal_to(
                [
                    (("record", "train", "cat"), 15),
                    (("record", "train", "dog"), 14),  # 3 was dropped
                    (("record", "eval", "cat"), 5),
                    (("record", "eval", "dog"), 4),  # 31 was dropped
                ]
            ),
            label="Counts",
        )

    kept = {ex["sha256"]: ex for ex in examples if ex["id"] not in (3, 31, 40)}
    vocab = ["dog", "cat"]
    seen = []
    for split in SPLITS:
        for index in range(SHARDS[split]):
            uri = join(root, "out", split, schema.shard_name(index, SHARDS[split]))
            assert storage.exists(uri), uri  # every shard, empty ones too (test has no images)
            records = _records(uri)
            assert records or split == "test", uri
            hashes = []
            for record in records:
                features = tf.train.Example.FromString(record).features.feature
                image = features["image"].bytes_list.value[0]
                ex = kept[hashlib.sha256(image).hexdigest()]
                assert (ex["split"], schema.shard_of(ex["sha256"], SHARDS[split])) == (split, index)
                assert features["label"].int64_list.value[0] == ["dog", "cat"].index(ex["label"])
                assert features["label_name"].bytes_list.value[0].decode() == ex["label"]
                assert features["uri"].bytes_list.value[0].decode() == ex["uri"]
                assert record == schema.encode_example(
                    image, ["dog", "cat"].index(ex["label"]), ex["label"], ex["uri"]
                )
                hashes.append(ex["sha256"])
            assert hashes == sorted(hashes)  # each shard in content-hash order
            # byte for byte what one in-memory sort of the shard's examples gives, whatever the budget
            mine = [
                ex
                for ex in kept.values()
                if (ex["split"], schema.shard_of(ex["sha256"], SHARDS[split])) == (split, index)
            ]
            expected = sorted(
                (
                    ex["sha256"],
                    schema.encode_example(ex["image"], vocab.index(ex["label"]), ex["label"], ex["uri"]),
                )
                for ex in mine
            )
            assert storage.read_bytes(uri) == b"".join(schema.frame_record(r) for _, r in expected)
            seen += hashes
    assert sorted(seen) == sorted(kept)  # every kept example once, nothing else
    spills = storage.list_files(join(root, "spill"))
    assert spills and all(f.uri.endswith(".spill") for f in spills)  # the stage removes them
    keys_written = 3 + 2  # train's 3 shards and eval's 2: one file each per bundle, unless rotated
    assert len(spills) == keys_written if open_bytes > 1_000_000 else len(spills) > 2 * keys_written
    assert all(f.size <= open_bytes + 10_000 for f in spills)
