"""``finetune run``'s orchestrator: fingerprints, stage keys, skipping, failures and resuming.

One scenario runs the real stages on a tiny colour set (the candidate is never blessed, so
nothing is exported; registry.uri unset, so push is skipped); the other orchestration rules
run with fake stages that only write the files the real ones would leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import types

import pytest
from PIL import Image

from components.config import load_config
from components.core import outputs, storage
from components.core.errors import ConfigError, StageError
from pipeline import keys, orchestrator
from pipeline import run as pipeline_run
from pipeline.record import StageEntry
from tests.train_helpers import copy_prepared, make_colour_images, train_config

STAGE_NAMES = ("preprocess", "train", "evaluate", "push")


def _statuses(record: dict) -> dict[str, str]:
    return {name: entry["status"] for name, entry in record["stages"].items()}


def _on_disk(run_dir) -> dict:
    return json.loads(open(os.path.join(run_dir, "run.json")).read())


# --- input fingerprint -------------------------------------------------------------------------


def _files(root, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return str(root)


def _fingerprint(source: str) -> str:
    return keys.input_fingerprint(load_config(None, [f"data.source={source}", "run_dir=unused"]))


FILES = {"cat/a.jpg": b"a" * 100, "cat/b.jpg": b"b" * 50, "dog/c.jpg": b"c" * 70}


def test_fingerprint_of_a_folder_is_its_content_not_its_path(tmp_path):
    first = _fingerprint(_files(tmp_path / "one", FILES))
    assert first == _fingerprint(_files(tmp_path / "two", FILES)) == _fingerprint(str(tmp_path / "two") + "/")
    assert len(first) == 64
    changed = {**FILES, "cat/a.jpg": b"A" + b"a" * 99}  # same name and size, other bytes
    assert _fingerprint(_files(tmp_path / "three", changed)) != first
    renamed = {"cat/a2.jpg": FILES["cat/a.jpg"], **{k: v for k, v in FILES.items() if k != "cat/a.jpg"}}
    assert _fingerprint(_files(tmp_path / "four", renamed)) != first
    relabelled = {"dog/a.jpg" if k == "cat/a.jpg" else k: v for k, v in FILES.items()}
    assert _fingerprint(_files(tmp_path / "five", relabelled)) != first
    with pytest.raises(ConfigError, match="no files under"):
        _fingerprint(str(tmp_path / "missing"))


def test_fingerprint_of_a_manifest_covers_its_bytes_and_the_files_it_lists(tmp_path):
    def manifest(folder, text: str, files=FILES) -> str:
        _files(tmp_path / folder / "images", files)
        path = tmp_path / folder / "labels.csv"
        path.write_text(text)
        return str(path)

    rows = "uri,label\nimages/cat/a.jpg,cat\nimages/dog/c.jpg,dog\nimages/gone.jpg,dog\n"
    first = _fingerprint(manifest("one", rows))
    assert first == _fingerprint(manifest("two", rows))  # moved with its images: same
    assert _fingerprint(manifest("three", rows, {**FILES, "cat/b.jpg": b"unlisted"})) == first
    assert _fingerprint(manifest("four", rows, {**FILES, "dog/c.jpg": b"x" * 70})) != first
    assert _fingerprint(manifest("five", rows.replace(",dog\n", ",wolf\n"))) != first
    appeared = manifest("six", rows, {**FILES, "gone.jpg": b"now here"})
    assert _fingerprint(appeared) != first
    with pytest.raises(ConfigError, match="manifest not found"):
        _fingerprint(str(tmp_path / "nothing.csv"))


def test_fingerprint_of_1300_files_is_fast(tmp_path):
    rng = os.urandom(40_000)
    files = {f"class{i % 13}/{i:05d}.jpg": rng[i:] for i in range(1300)}  # ~50 MB
    source = _files(tmp_path / "many", files)
    started = time.perf_counter()
    _fingerprint(source)
    seconds = time.perf_counter() - started
    print(f"fingerprint of 1,300 files (52 MB): {seconds:.2f} s")
    assert seconds < 3.0  # well under a second on an idle machine; the suite's machine is shared


@pytest.mark.gcs
def test_fingerprint_on_gcs_uses_the_listing_checksums(gcs_prefix, monkeypatch):
    def upload(prefix: str, files: dict[str, bytes]) -> str:
        for rel, data in files.items():
            storage.write_bytes(storage.join(prefix, rel), data)
        return prefix

    first = _fingerprint(upload(storage.join(gcs_prefix, "one"), FILES))
    storage.write_bytes(storage.join(gcs_prefix, "one", "cat") + "/", b"")  # a folder placeholder
    # Reading any object would be a download: the fingerprint comes from the listing alone.
    monkeypatch.setattr(storage, "read_bytes", lambda uri: pytest.fail(f"downloaded {uri}"))
    assert _fingerprint(storage.join(gcs_prefix, "one")) == first
    monkeypatch.undo()
    upload(storage.join(gcs_prefix, "one"), {"cat/a.jpg": FILES["cat/a.jpg"]})  # new generation, same bytes
    assert _fingerprint(storage.join(gcs_prefix, "one")) == first
    assert _fingerprint(upload(storage.join(gcs_prefix, "two"), FILES)) == first
    assert _fingerprint(upload(storage.join(gcs_prefix, "two"), {"dog/c.jpg": b"d" * 70})) != first
    rows = "uri,label\nimages/cat/a.jpg,cat\nimages/dog/c.jpg,dog\n"
    upload(storage.join(gcs_prefix, "m", "images"), FILES)
    storage.write_text(storage.join(gcs_prefix, "m", "labels.csv"), rows)
    listed = _fingerprint(storage.join(gcs_prefix, "m", "labels.csv"))
    upload(storage.join(gcs_prefix, "m", "images"), {"dog/c.jpg": b"d" * 70})
    assert _fingerprint(storage.join(gcs_prefix, "m", "labels.csv")) != listed


# --- stage keys and the skip decision ----------------------------------------------------------


def _config(*overrides: str):
    return load_config(None, ["data.source=/data", "run_dir=/runs/r", *overrides])


def _keys(*overrides: str) -> dict[str, str]:
    return keys.stage_keys(_config(*overrides), "f" * 64)


def test_stage_keys_change_from_the_changed_stage_on():
    base = _keys()
    for overrides, first_changed in (
        (["data.split={train: 0.7, eval: 0.2, test: 0.1}"], "preprocess"),
        (["model.image_size=96"], "preprocess"),
        (["preprocess.jpeg_quality=90"], "preprocess"),
        (["cluster.workers=4"], "preprocess"),  # num_shards 0: a train file per worker at least
        (["preprocess.num_shards=4"], "preprocess"),
        (["train.seed=1"], "train"),
        (["train.augment.flip=false"], "train"),
        (["model.dropout=0.3"], "train"),
        (["name=other"], "train"),
        (["gate.min_improvement=0.01"], "evaluate"),
        (["export.top_k=3"], "evaluate"),
        (["registry.uri=/reg"], "push"),
    ):
        now = _keys(*overrides)
        changed = [s for s in STAGE_NAMES if now[s] != base[s]]
        assert changed == list(STAGE_NAMES[STAGE_NAMES.index(first_changed) :]), overrides
    assert keys.stage_keys(_config(), "0" * 64)["preprocess"] != base["preprocess"]


def test_execution_only_keys_and_paths_do_not_change_any_key():
    assert _keys() == _keys(
        "run_dir=/elsewhere",
        "data.source=gs://bucket/images",
        "preprocess.num_workers=4",
        "preprocess.runner=BundleBasedDirectRunner",
        "preprocess.pipeline_options={direct_running_mode: in_memory}",
        "train.backup_every_steps=100",
        "evaluate.batch_size=8",
        "registry.production_alias=live",
        "model.image_size=224",  # mobilenet_v2's default: the same size as 0
    )
    assert set(keys.config_slice(_config(), "push")) == {"registry.uri", "registry.promote_to"}
    # An explicit shard count does not depend on the number of training workers.
    assert _keys("preprocess.num_shards=4") == _keys("preprocess.num_shards=4", "cluster.workers=4")
    assert "cluster.workers" in keys.config_slice(_config(), "preprocess")
    champion = _config("registry.uri=/reg", "gate.compare_to_production=true")
    assert keys.config_slice(champion, "evaluate")["registry.production_alias"] == "production"


def test_decide_skips_only_a_finished_stage_with_the_same_key():
    done = {"status": "skipped", "key": "k", "completed": "2026-11-26T09:30:00Z"}
    assert keys.decide(StageEntry.from_json(done), "k", False, False) == (
        True,
        "unchanged since 2026-11-26T09:30:00Z",
    )
    for previous, key, earlier_ran, force, why in (
        (done, "k", False, True, "--force"),
        (done, "k", True, False, "an earlier stage ran"),
        (done, "other", False, False, "its inputs or configuration changed"),
        (None, "k", False, False, "no finished run recorded"),
        ({"status": "failed", "key": "k"}, "k", False, False, "it failed last time"),
        ({"status": "running", "key": "k"}, "k", False, False, "it was interrupted"),
    ):
        assert keys.decide(previous and StageEntry.from_json(previous), key, earlier_ran, force) == (
            False,
            why,
        )


# --- the run with fake stages ------------------------------------------------------------------


class FakeStages:
    """Stage modules whose ``run`` records the call and writes the files the real stage
    leaves; ``fail[stage]`` is an exception to raise instead, ``during[stage]`` a check."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[str] = []
        self.fail: dict[str, BaseException] = {}
        self.during: dict[str, object] = {}
        self.blessed = False
        for name in STAGE_NAMES:
            module = types.ModuleType(f"fake_{name}")
            module.run = lambda config, name=name: self._run(name, config)
            monkeypatch.setitem(sys.modules, f"components.{name}.stage", module)

    def _run(self, name: str, config) -> dict:
        self.calls.append(name)
        if name in self.during:
            self.during[name](config)
        if name in self.fail:
            raise self.fail[name]
        folder = os.path.join(config.run_dir, name)
        os.makedirs(folder, exist_ok=True)
        result = {"status": "ok"}
        if name == "preprocess":  # a shard, and its record that a skip checks
            shard = b"records"
            _files(folder, {"train/data-00000-of-00001.tfrecord": shard})
            facts = {"bytes": len(shard), "sha256": hashlib.sha256(shard).hexdigest()}
            result["shards"] = {"train/data-00000-of-00001.tfrecord": facts}
            result |= {"classes": ["a", "b"], "image_size": 32}
        if name == "train":  # the models and the records they came from, that later skips check
            for phase in ("baseline", "candidate"):
                _files(folder, {f"{phase}/model.keras": b"weights"})
            result["models"] = outputs.file_facts(folder, outputs.MODEL_FILES)
            prep = json.loads(open(os.path.join(config.run_dir, "preprocess", "summary.json")).read())
            result["inputs_sha256"] = outputs.records_digest(prep)
        if name == "evaluate":
            result = {"blessed": self.blessed, "reason": "fake verdict"}
            result["models"] = outputs.file_facts(os.path.join(config.run_dir, "train"), outputs.MODEL_FILES)
            _files(config.run_dir, {"report.html": b"<html>"})
            if self.blessed:
                _files(config.run_dir, {"export/saved_model/saved_model.pb": b"pb"})
                outputs.mark_owned(os.path.join(config.run_dir, "export"), "export", sealed=True)
                result["export"] = {"fingerprint": "sha256:fake"}
            _files(folder, {"verdict.json": json.dumps(result).encode()})
            return result
        if name == "push":
            pushed = self.blessed
            reason = "pushed" if pushed else "not blessed; nothing pushed"
            result |= {"pushed": pushed, "version": 7 if pushed else None, "reason": reason}
            result |= {"fingerprint": "sha256:fake"} if pushed else {}
        _files(folder, {"summary.json": json.dumps(result).encode()})
        return result


@pytest.fixture
def fakes(monkeypatch) -> FakeStages:
    return FakeStages(monkeypatch)


@pytest.fixture
def fake_config(tmp_path):
    source = _files(tmp_path / "images", FILES)

    def make(*overrides: str):
        return load_config(None, [f"data.source={source}", f"run_dir={tmp_path / 'run'}", *overrides])

    return make


def test_fake_run_skips_reruns_and_forces(fakes, fake_config, capsys):
    record = pipeline_run.run(fake_config())
    assert fakes.calls == ["preprocess", "train", "evaluate"]
    assert _statuses(record) == {"preprocess": "ok", "train": "ok", "evaluate": "ok", "push": "skipped"}
    assert record["stages"]["push"]["reason"] == "registry.uri is not set"
    out = capsys.readouterr().out
    assert "[run] 2/4 train: running (no finished run recorded)" in out
    assert "[run] verdict: NOT BLESSED: fake verdict" in out
    assert "[run] registry: no version (registry.uri is not set)" in out
    fakes.calls.clear()
    pipeline_run.run(fake_config("train.baseline_epochs=9"))
    assert fakes.calls == ["train", "evaluate"]
    assert "[run] 1/4 preprocess: unchanged since 20" in capsys.readouterr().out
    fakes.calls.clear()
    pipeline_run.run(fake_config("train.baseline_epochs=9", "evaluate.seed=3"))
    assert fakes.calls == ["evaluate"]
    fakes.calls.clear()
    record = pipeline_run.run(fake_config("train.baseline_epochs=9", "evaluate.seed=3"), force=True)
    assert fakes.calls == ["preprocess", "train", "evaluate"] and record["force"] is True
    assert all(e["reason"] == "--force" for e in list(record["stages"].values())[:3])


def test_fake_rerun_takes_unchanged_files_checksums_from_the_run_directorys_cache(
    fakes, fake_config, tmp_path, capsys
):
    for rel in FILES:  # old enough to be recorded (a just-written file is racy)
        os.utime(tmp_path / "images" / rel, ns=(0, time.time_ns() - 3600 * 10**9))
    first = pipeline_run.run(fake_config())
    assert "; 3 files hashed, 0 from the cache)" in capsys.readouterr().out
    assert os.path.isfile(keys.fingerprint_cache(str(tmp_path / "run")))
    again = pipeline_run.run(fake_config())
    assert "; 0 files hashed, 3 from the cache)" in capsys.readouterr().out
    assert again["input_fingerprint"] == first["input_fingerprint"] == _fingerprint(str(tmp_path / "images"))


def test_fake_run_reruns_a_stage_whose_outputs_are_gone_and_the_ones_after(fakes, fake_config, tmp_path):
    pipeline_run.run(fake_config())
    os.remove(tmp_path / "run" / "train" / "candidate" / "model.keras")
    fakes.calls.clear()
    record = pipeline_run.run(fake_config())
    assert fakes.calls == ["train", "evaluate"]
    assert record["stages"]["train"]["reason"] == "its outputs are gone"
    assert record["stages"]["evaluate"]["reason"] == "an earlier stage ran"


def test_fake_failure_is_recorded_and_the_next_run_resumes(fakes, fake_config, tmp_path):
    def running_is_on_disk(config):
        on_disk = _on_disk(config.run_dir)
        assert on_disk["status"] == "running"
        assert _statuses(on_disk) == {
            "preprocess": "ok",
            "train": "running",
            "evaluate": "pending",
            "push": "pending",
        }

    fakes.during["train"] = running_is_on_disk
    fakes.fail["train"] = ZeroDivisionError("division by zero")
    with pytest.raises(StageError) as raised:
        pipeline_run.run(fake_config())
    assert str(raised.value) == (
        "stage 'train' failed: ZeroDivisionError: division by zero; outputs of preprocess are kept; "
        "re-run to resume from train"
    )
    on_disk = _on_disk(tmp_path / "run")
    assert on_disk["status"] == "failed" and on_disk["error"].startswith("stage 'train' failed")
    assert (
        _statuses(on_disk)["train"] == "failed"
        and "ZeroDivisionError" in on_disk["stages"]["train"]["traceback"]
    )
    assert _statuses(on_disk)["evaluate"] == "pending"
    fakes.calls.clear()
    del fakes.fail["train"], fakes.during["train"]
    fakes.fail["evaluate"] = KeyboardInterrupt()  # killed: the record says what was running
    with pytest.raises(KeyboardInterrupt):
        pipeline_run.run(fake_config())
    assert _statuses(_on_disk(tmp_path / "run"))["evaluate"] == "running"
    fakes.calls.clear()
    del fakes.fail["evaluate"]
    record = pipeline_run.run(fake_config())
    assert fakes.calls == ["evaluate"] and record["stages"]["evaluate"]["reason"] == "it was interrupted"


def test_fake_push_runs_with_a_registry_blessed_or_not(fakes, fake_config, tmp_path, capsys):
    registry = f"registry.uri={tmp_path / 'registry'}"
    record = pipeline_run.run(fake_config(registry))
    assert fakes.calls[-1] == "push" and record["stages"]["push"]["status"] == "ok"
    assert record["stages"]["push"]["outputs"]["reason"] == "not blessed; nothing pushed"
    assert "[run] registry: no version (not blessed; nothing pushed)" in capsys.readouterr().out
    fakes.blessed, fakes.calls[:] = True, []
    record = pipeline_run.run(fake_config(registry, "gate.min_improvement=-1"))
    assert fakes.calls == ["evaluate", "push"]
    assert record["stages"]["evaluate"]["outputs"]["export"].endswith("saved_model")
    out = capsys.readouterr().out
    assert "[run] verdict: BLESSED: fake verdict" in out and "[run] registry: version 7 of 'model'" in out


# --- the real stages on a tiny set -----------------------------------------------------------------


def _real_config(source, run_dir, *overrides: str):
    return train_config(
        str(run_dir),
        f"data.source={source}",
        "data.split={train: 0.6, eval: 0.2, test: 0.2}",
        "preprocess.num_workers=1",
        "preprocess.num_shards=1",
        "train.baseline_epochs=1",
        "evaluate.bootstrap_samples=100",
        "evaluate.misclassified_examples=0",
        "gate.min_improvement=1",  # never blessed: nothing to export
        "export.tflite=false",
        *overrides,
    )


def _mtimes(run_dir) -> dict[str, float]:
    files = {"preprocess": "preprocess/summary.json", "train": "train/summary.json"}
    files["evaluate"] = "evaluate/verdict.json"
    return {stage: os.path.getmtime(os.path.join(run_dir, path)) for stage, path in files.items()}


def test_real_stages_skip_when_up_to_date_and_resume_after_a_failure(tmp_path, monkeypatch, capsys):
    from components.evaluate import stage as evaluate_stage
    from components.train import stage as train_stage

    source, run_dir = tmp_path / "images", tmp_path / "run"
    make_colour_images(str(source), per_class=15)
    record = pipeline_run.run(_real_config(source, run_dir))
    assert _statuses(record) == {"preprocess": "ok", "train": "ok", "evaluate": "ok", "push": "skipped"}
    assert _on_disk(run_dir) == json.loads(json.dumps(record))
    assert record["input_fingerprint"] == keys.input_fingerprint(_real_config(source, run_dir))
    assert record["stages"]["evaluate"]["outputs"]["blessed"] is False
    out = capsys.readouterr().out
    for line in (
        "[run] 1/4 preprocess: running",
        "[run] 3/4 evaluate: done in ",
        "[run] verdict: NOT BLESSED",
    ):
        assert line in out
    assert f"[run] report: {run_dir / 'report.html'}" in out and os.path.exists(run_dir / "report.html")
    before = _mtimes(run_dir)

    moved = tmp_path / "moved"

    def move_source():
        shutil.move(source, moved)
        return _real_config(moved, run_dir)

    for label, make in (
        ("unchanged", lambda: _real_config(source, run_dir)),
        (
            "execution-only keys",
            lambda: _real_config(source, run_dir, "preprocess.num_workers=2", "evaluate.batch_size=16"),
        ),
        ("source moved", move_source),
    ):
        record = pipeline_run.run(make())
        assert set(_statuses(record).values()) == {"skipped"} and _mtimes(run_dir) == before, label
        assert "[run] 2/4 train: unchanged since " in capsys.readouterr().out

    def gate_fails(config):
        raise evaluate_stage.gate.GateError("the gate cannot decide")

    monkeypatch.setattr(evaluate_stage, "run", gate_fails)
    with pytest.raises(StageError, match="stage 'evaluate' failed: the gate cannot decide; outputs of "):
        pipeline_run.run(_real_config(moved, run_dir, "evaluate.seed=1"))
    assert _statuses(_on_disk(run_dir))["evaluate"] == "failed"
    monkeypatch.undo()
    record = pipeline_run.run(_real_config(moved, run_dir, "evaluate.seed=1"))
    assert _statuses(record) == {
        "preprocess": "skipped",
        "train": "skipped",
        "evaluate": "ok",
        "push": "skipped",
    }
    assert _mtimes(run_dir)["train"] == before["train"] != _mtimes(run_dir)["evaluate"]
    record = pipeline_run.run(
        _real_config(moved, run_dir, "evaluate.seed=1", f"registry.uri={tmp_path / 'reg'}")
    )
    assert [e["status"] for e in record["stages"].values()] == ["skipped", "skipped", "skipped", "ok"]
    assert record["stages"]["push"]["outputs"]["pushed"] is False  # not blessed: push says why
    assert "[run] registry: no version (not blessed: " in capsys.readouterr().out

    touched = moved / "red" / "000.jpg"
    Image.open(touched).save(touched, quality=70)  # same name, other bytes

    def train_fails(config):
        raise RuntimeError("stop after preprocess")

    monkeypatch.setattr(train_stage, "run", train_fails)
    with pytest.raises(StageError, match="stage 'train' failed: .*re-run to resume from train"):
        pipeline_run.run(_real_config(moved, run_dir, "evaluate.seed=1"))
    assert (
        _statuses(_on_disk(run_dir))["preprocess"] == "ok"
        and _mtimes(run_dir)["preprocess"] > before["preprocess"]
    )


def test_a_skip_checks_every_shard_preprocessing_recorded(tiny_prepared, tmp_path):
    run_dir = copy_prepared(tiny_prepared, str(tmp_path / "run"))
    folder = os.path.join(run_dir, "preprocess")
    shards = json.loads(open(os.path.join(folder, "summary.json")).read())["shards"]
    on_disk = {
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if name.endswith(".tfrecord")
    }
    assert set(shards) == on_disk and len(on_disk) == 3 * 2  # every split's 2 shards, empty ones too
    for rel, facts in shards.items():
        data = open(os.path.join(folder, rel), "rb").read()
        assert facts == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel

    finished = orchestrator.stage("preprocess").finished
    config = train_config(run_dir)
    assert (
        finished(config)["records"]
        == json.loads(open(os.path.join(folder, "summary.json")).read())["records"]
    )
    shard = os.path.join(folder, "train", "data-00000-of-00002.tfrecord")
    original = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(original[: len(original) // 2])  # truncated: training would see half of it
    assert finished(config) is None
    os.remove(shard)
    assert finished(config) is None
    with open(shard, "wb") as f:
        f.write(original)
    assert finished(config) is not None
