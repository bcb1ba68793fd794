"""The preprocessing stage end to end on the real local runner: every input accounted for."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from components.preprocess.analysis import read_vocabulary
from tests.image_fixtures import RED, make_odd_and_bad
from tests.preprocess_helpers import PUBLISHED, all_records, out, read_jsonl, run_stage


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """One run over every valid odd file and every bad kind, plus a duplicate."""
    source = str(tmp_path_factory.mktemp("odd"))
    expected = make_odd_and_bad(source)
    shutil.copyfile(os.path.join(source, "alpha/rgb.jpg"), os.path.join(source, "beta/same_as_rgb.jpg"))
    run_dir = str(tmp_path_factory.mktemp("run"))
    summary = run_stage(source, run_dir, "preprocess.max_bad_fraction=1.0")
    return source, expected, run_dir, summary


def test_every_input_ends_in_a_record_a_dead_letter_or_the_duplicates(odd_run):
    source, expected, run_dir, summary = odd_run
    records = all_records(run_dir)
    recorded = {os.path.relpath(r["uri"], source) for rs in records.values() for r in rs}
    dead = {os.path.relpath(d["uri"], source): d for d in read_jsonl(out(run_dir, "dead_letter.jsonl"))}
    dups = read_jsonl(out(run_dir, "duplicates.jsonl"))

    valid = {rel for rel, reason in expected.items() if reason is None}
    assert len(dups) == 1
    dropped = os.path.relpath(dups[0]["uri"], source)
    assert {dropped, os.path.relpath(dups[0]["duplicate_of"], source)} == {
        "alpha/rgb.jpg",
        "beta/same_as_rgb.jpg",
    }
    assert dups[0]["conflicting_label"] is True
    assert recorded | {dropped} == valid | {"beta/same_as_rgb.jpg"}
    assert {rel: d["reason"] for rel, d in dead.items()} == {
        rel: reason for rel, reason in expected.items() if reason is not None
    }
    assert all(d["detail"] and d["stage"] for d in dead.values())
    assert summary["inputs"] == len(expected) + 1
    assert sum(summary["records"].values()) + summary["dead_letter"]["count"] + 1 == summary["inputs"]
    assert summary["dead_letter"]["by_reason"]["not_an_image"] == 2
    assert summary["duplicates"] == {
        "count": 1,
        "cross_split": dups[0]["cross_split"],
        "conflicting_label": 1,
    }


def test_records_decode_to_the_configured_size_with_orientation_applied(odd_run):
    source, _, run_dir, summary = odd_run
    records = [r for rs in all_records(run_dir).values() for r in rs]
    assert summary["classes"] and set(summary["classes"]) == {r["label_name"] for r in records}
    for r in records:
        image = Image.open(io.BytesIO(r["image"]))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
        assert summary["classes"][r["label"]] == r["label_name"]
        assert r["label_name"] == os.path.relpath(r["uri"], source).split("/")[0]
    rotated = next(r for r in records if r["uri"].endswith("rotated.jpg"))
    pixels = np.asarray(Image.open(io.BytesIO(rotated["image"]))).astype(int)
    assert np.abs(pixels[:16].mean(axis=(0, 1)) - RED).max() < 30


def test_outputs_are_complete_and_leave_no_temporary_files(odd_run):
    _, _, run_dir, summary = odd_run
    assert sorted(os.listdir(run_dir)) == ["preprocess"]
    names = set(os.listdir(out(run_dir)))
    assert names == PUBLISHED
    for split in ("train", "eval", "test"):  # preprocess.num_shards 0: from the data, one file each here
        assert os.listdir(out(run_dir, split)) == ["data-00000-of-00001.tfrecord"]
        assert summary["shards"][f"{split}/data-00000-of-00001.tfrecord"]["bytes"] > 0 or split != "train"
    with open(out(run_dir, "summary.json")) as f:
        assert json.load(f) == summary
    for key in (
        "records",
        "classes",
        "per_class",
        "dead_letter",
        "duplicates",
        "leakage",
        "seconds",
        "images_per_second",
    ):
        assert key in summary
    assert len(summary["image_stats"]["mean"]) == 3


# Too many bad inputs (this fixture at the default preprocess.max_bad_fraction): the StageError,
# the dead letters and the failed summary written before failing, and no published split or
# transform are checked on the same run through the command line, in
# tests/test_cli.py::test_preprocess_with_only_source_and_run_dir (one stage run fewer).


def _jpeg(path: str, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path, "JPEG")


def test_split_folders_unknown_labels_leakage_and_carved_eval(tmp_path):
    source = tmp_path / "src"
    for i in range(30):
        _jpeg(str(source / "train" / ("cat" if i % 2 else "dog") / f"{i}.jpg"), i)
    for i in range(4):
        _jpeg(str(source / "test" / "cat" / f"t{i}.jpg"), 100 + i)
    _jpeg(str(source / "test" / "bird" / "b.jpg"), 200)
    shutil.copyfile(source / "train" / "cat" / "1.jpg", source / "test" / "cat" / "leak.jpg")
    run_dir = str(tmp_path / "run")
    summary = run_stage(str(source), run_dir)

    assert summary["layout"] == "split_folders"
    assert summary["records"]["test"] == 5  # 4 + the leaked copy, kept in test
    assert summary["records"]["train"] + summary["records"]["eval"] == 29  # 30 minus the leaked copy
    assert 0 < summary["records"]["eval"] < 10
    assert summary["leakage"]["count"] == 1
    assert summary["leakage"]["examples"][0]["uri"].endswith("train/cat/1.jpg")
    assert summary["leakage"]["examples"][0]["kept_split"] == "test"
    dead = read_jsonl(out(run_dir, "dead_letter.jsonl"))
    assert [(d["label"], d["split"], d["stage"], d["reason"]) for d in dead] == [
        ("bird", "test", "ApplyVocabulary", "label_not_in_train")
    ]
    assert sorted(summary["classes"]) == ["cat", "dog"]


def test_csv_and_jsonl_manifests(tmp_path):
    images = tmp_path / "images"
    for i in range(12):
        _jpeg(str(images / f"{i}.jpg"), 300 + i)
    rows = [
        f"images/{i}.jpg,{'red' if i < 6 else 'blue'},{'test' if i in (0, 6) else 'train'}" for i in range(12)
    ]
    rows += ["images/missing.jpg,red,train", "images/1.jpg,,train", "images/2.jpg,red,holdout"]
    (tmp_path / "m.csv").write_text("uri,label,split\n" + "\n".join(rows) + "\n")
    summary = run_stage(str(tmp_path / "m.csv"), str(tmp_path / "run_csv"), "preprocess.max_bad_fraction=0.5")
    assert summary["layout"] == "manifest"
    assert summary["records"]["test"] == 2
    assert summary["records"]["train"] + summary["records"]["eval"] == 10
    assert summary["dead_letter"]["by_reason"] == {"bad_manifest_row": 1, "missing_label": 1, "unreadable": 1}

    lines = [json.dumps({"uri": str(images / f"{i}.jpg"), "label": "x" if i % 3 else "y"}) for i in range(12)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
    summary = run_stage(
        str(tmp_path / "m.jsonl"), str(tmp_path / "run_jsonl"), "preprocess.max_bad_fraction=0.5"
    )
    assert sum(summary["records"].values()) == 12
    assert summary["dead_letter"]["by_reason"] == {"bad_manifest_row": 1}


def test_any_unicode_label_round_trips_and_separator_labels_are_dead_letters(tmp_path):
    # Class names that are valid but unusual keep their ids; names holding a line separator
    # (which would split the one-per-line vocabulary and shift every later class id) or a
    # control character are dead letters at listing time, with their own reason.
    good = ["café", "α β", "日本", "a,b", "z-w"]
    bad = ["line\u2028sep", "para\u2029sep", "bell\x07", "new\nline"]
    images = tmp_path / "images"
    seed = 500
    rows = []
    for label in good + bad:
        for _ in range(6):
            seed += 1
            path = images / f"{seed}.jpg"
            _jpeg(str(path), seed)
            rows.append(json.dumps({"uri": f"images/{seed}.jpg", "label": label}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    folders = tmp_path / "folders"
    _jpeg(str(folders / "ok" / "1.jpg"), 1)
    _jpeg(str(folders / "ok" / "2.jpg"), 2)
    _jpeg(str(folders / "tab\u2028name" / "3.jpg"), 3)  # a folder name holding U+2028

    run_dir = str(tmp_path / "run")
    summary = run_stage(
        str(tmp_path / "m.jsonl"),
        run_dir,
        "preprocess.max_bad_fraction=0.5",
        "data.split={train: 1.0, eval: 0.0, test: 0.0}",
    )
    assert sorted(summary["classes"]) == sorted(good)
    assert summary["dead_letter"]["by_reason"] == {"bad_label": 6 * len(bad)}
    assert read_vocabulary(out(run_dir, "transform_fn")) == summary["classes"]
    records = all_records(run_dir)["train"]
    assert len(records) == 6 * len(good)
    assert all(summary["classes"][r["label"]] == r["label_name"] for r in records)  # ids match names
    dead = read_jsonl(out(run_dir, "dead_letter.jsonl"))
    assert {d["reason"] for d in dead} == {"bad_label"} and all(
        "not allowed in a class name" in d["detail"] for d in dead
    )

    summary = run_stage(
        str(folders),
        str(tmp_path / "run_folders"),
        "preprocess.max_bad_fraction=0.5",
        "data.split={train: 1.0, eval: 0.0, test: 0.0}",
    )
    assert summary["classes"] == ["ok"] and summary["dead_letter"]["by_reason"] == {"bad_label": 1}


def test_reruns_are_idempotent_and_added_images_keep_their_splits(tmp_path):
    source = tmp_path / "src"
    for i in range(40):
        _jpeg(str(source / ("a" if i % 2 else "b") / f"{i}.jpg"), 400 + i)
    run_dir = str(tmp_path / "run")

    def placement():
        return {r["uri"]: (split, r["label_name"]) for split, rs in all_records(run_dir).items() for r in rs}

    def shard_bytes():
        return {
            os.path.join(split, name): open(os.path.join(out(run_dir), split, name), "rb").read()
            for split in ("train", "eval", "test")
            for name in sorted(os.listdir(os.path.join(out(run_dir), split)))
        }

    run_stage(str(source), run_dir, "preprocess.num_shards=4")
    first, first_bytes = placement(), shard_bytes()
    # Again, on Beam's two worker processes (other bundles, other processes' protobuf maps):
    run_stage(str(source), run_dir, "preprocess.num_shards=4", "preprocess.num_workers=2")
    assert placement() == first
    # The same images give byte-identical shards: same shard per image, same order within.
    assert shard_bytes() == first_bytes
    names = [f"data-{i:05d}-of-00004.tfrecord" for i in range(4)]
    assert sorted(first_bytes) == [os.path.join(s, n) for s in ("eval", "test", "train") for n in names]
    assert sorted(os.listdir(run_dir)) == ["preprocess"]

    for i in range(40, 60):
        _jpeg(str(source / ("a" if i % 2 else "b") / f"{i}.jpg"), 400 + i)
    run_stage(str(source), run_dir)
    after = placement()
    assert len(after) == 60
    assert {uri: after[uri] for uri in first} == first
