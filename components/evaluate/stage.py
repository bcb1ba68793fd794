"""The evaluation stage: ``finetune evaluate``, the gate before anything is published.

Reads the preprocessing stage's test split (which neither earlier stage has read) and the
trainer's two models, scores both on the same examples in the same order, lets the pure
``gate.decide`` bless the candidate or not, and writes under ``<run_dir>/``:

* ``evaluate/verdict.json`` and a ``BLESSED`` or ``NOT_BLESSED`` marker (always);
* ``evaluate/metrics.json`` (every metric of each model) and ``evaluate/config.yaml``;
* ``export/saved_model/`` (and ``export/model.tflite`` with ``labels.txt`` for MobileNet
  backbones) only when blessed; an earlier export is removed when not;
* ``report.html``, one self-contained page.

A candidate that loses is a normal outcome (the verdict says why); a missing model or an
empty test split is an error. Runs in one process (the chief's job in a cluster).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from typing import Any

import numpy as np
import tensorflow as tf

from components import registry
from components.config import Config, to_yaml
from components.core import outputs, storage
from components.core.errors import StageError
from components.evaluate import export, gate, metrics, report, scoring
from components.preprocess import schema
from components.preprocess.output import PreprocessOutput
from components.train import data, model
from components.train.output import TrainOutput

STAGE = "evaluate"
PHASES = ("baseline", "candidate")
MARKERS = {True: "BLESSED", False: "NOT_BLESSED"}
EXPORT = "export"  # <run_dir>/export: the blessed SavedModel (and TFLite model), evaluation's too


def say(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


def run(config: Config) -> dict[str, Any]:
    """Evaluates, decides, exports when blessed, reports; returns the verdict as written."""
    started = time.perf_counter()
    out = storage.join(config.run_dir, STAGE)
    prep = PreprocessOutput.read(config.run_dir)
    classes, size = prep.classes, prep.image_size
    if not prep.records.get("test", 0):
        raise StageError(
            f"the test split of {prep.dir} is empty: nothing to decide on; give the data a test split "
            "(a test/ folder, a manifest split column, or data.split.test > 0) and re-run preprocessing"
        )
    trained = TrainOutput.read(config.run_dir)
    train_dir = trained.dir
    export_dir = storage.join(config.run_dir, EXPORT)
    outputs.check_owned(out, STAGE)  # before any work: never delete a user's file
    outputs.check_owned(export_dir, EXPORT)
    test_files = data.record_files(prep.dir, "test")
    models = {phase: _load_model(trained.model_path(phase)) for phase in PHASES}
    model_files = trained.current_models()  # what this verdict is about
    storage.delete_tree(out)
    outputs.mark_owned(out, STAGE)
    storage.write_text(storage.join(out, "config.yaml"), to_yaml(config))
    scored, verdict = _score_and_decide(config, models, test_files, classes, size)
    verdict["models"] = model_files
    e = config.evaluate
    results = {
        name: metrics.evaluate(scored.predictions(name), classes, e.top_k, e.calibration_bins)
        for name in scored.probs
    }
    say(("BLESSED: " if verdict["blessed"] else "NOT BLESSED: ") + verdict["reason"])
    storage.delete_tree(export_dir)  # never leave an older export behind
    facts = {phase: _model_facts(models[phase], train_dir, phase, size) for phase in PHASES}
    if verdict["blessed"]:
        verdict["export"] = _export(config, models["candidate"], prep, test_files, scored, verdict)
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(results, indent=2) + "\n")
    storage.write_text(storage.join(out, "verdict.json"), json.dumps(verdict, indent=2) + "\n")
    storage.write_text(storage.join(out, MARKERS[verdict["blessed"]]), verdict["reason"] + "\n")
    outputs.mark_owned(out, STAGE, sealed=True)
    report_path = storage.join(config.run_dir, "report.html")
    report.write_report(report_path, _report_data(config, prep, train_dir, results, verdict, scored, facts))
    say(f"done in {time.perf_counter() - started:.1f} s; report: {report_path}")
    return verdict


def _score_and_decide(
    config: Config, models: dict[str, Any], test_files: list[str], classes: list[str], size: int
) -> tuple[scoring.Scored, dict[str, Any]]:
    """Scores both models (and the production champion, when asked for and comparable) on
    the same test examples and lets the gate decide; returns the scores and the verdict."""
    champion, champion_note = _find_champion(config, classes)
    scorers = {phase: scoring.keras_scorer(models[phase]) for phase in PHASES}
    if champion:
        scorers["champion"] = scoring.signature_scorer(champion[1].signatures[export.SERVING_EXAMPLES])
    e = config.evaluate
    say(f"scoring {', '.join(scorers)} on the test split")
    scored = scoring.score(scorers, test_files, size, e.batch_size, classes, e.misclassified_examples)
    verdict = gate.decide(
        scored.predictions("candidate"),
        scored.predictions("baseline"),
        config.gate,
        e,
        gate.Champion(champion[0], scored.predictions("champion")) if champion else None,
    ).to_dict()
    if champion_note:
        verdict["champion_note"] = champion_note
        say(champion_note)
    return scored, verdict


def _load_model(path: str) -> Any:
    if not storage.exists(path):
        raise StageError(f"model {path} not found; run `finetune train` with this config first")
    with storage.local_copy(path) as local:
        return model.load_model(local)


def _find_champion(config: Config, classes: list[str]) -> tuple[tuple[int, Any] | None, str | None]:
    """The registry's production model for ``name`` as ``(version, loaded SavedModel)``, or
    None and a note saying why there is nothing to compare with."""
    if not config.gate.compare_to_production:
        return None, None
    uri, name, alias = config.registry.uri, config.name, config.registry.production_alias
    version = registry.resolve_alias(uri, name, alias)
    if version is None:
        return (
            None,
            f"no '{alias}' model for '{name}' in {uri} yet: the candidate is compared with the baseline only",
        )
    where = registry.version_uri(uri, name, version)
    labels = (export.read_extra(where, export.LABELS_FILE) or "").splitlines()
    if labels != classes:
        return None, (
            f"{alias} version {version} has labels {labels or 'unknown'}, this run {classes}: "
            "not comparable, so the candidate is compared with the baseline only"
        )
    return (version, export.load_saved_model(where)), None


def _model_facts(keras_model: Any, train_dir: str, phase: str, size: int) -> dict[str, Any]:
    """Size of the saved Keras model and its latency on one image."""
    path = storage.join(train_dir, phase, "model.keras")
    predict = scoring.keras_scorer(keras_model)
    one = tf.zeros([1, size, size, 3])
    return {
        "size_bytes": len(storage.read_bytes(path)),
        "latency_ms": scoring.latency_ms(lambda: predict(one, None)),
    }


def _export(
    config: Config,
    keras_model: Any,
    prep: PreprocessOutput,
    test_files: list[str],
    scored: scoring.Scored,
    verdict: dict[str, Any],
) -> dict[str, Any]:
    """Stages the SavedModel, checks it against the trained model on the test split, adds
    the TFLite model, then publishes (``saved_model.pb`` last)."""
    classes, size = prep.classes, prep.image_size
    export_dir = storage.join(config.run_dir, EXPORT)
    target = storage.join(export_dir, "saved_model")
    outputs.mark_owned(export_dir, EXPORT)  # all of it is this stage's until it is sealed
    with export.staged(keras_model, classes, size, config.export.top_k) as local:
        loaded = tf.saved_model.load(local)
        examples = loaded.signatures[export.SERVING_EXAMPLES]
        check = scoring.score(
            {"saved_model": scoring.signature_scorer(examples)},
            test_files,
            size,
            config.evaluate.batch_size,
            classes,
        )
        difference = float(np.abs(check.probs["saved_model"] - scored.probs["candidate"]).max())
        if difference > 1e-3:
            raise StageError(
                f"the exported SavedModel disagrees with the trained candidate on the test split (largest "
                f"probability difference {difference:.3g}); nothing was published"
            )
        jpeg = tf.constant([next(scoring.batches(test_files, size, 1))["image"][0].numpy()])
        serve = loaded.signatures[export.SERVING_DEFAULT]
        facts: dict[str, Any] = {
            "path": target,
            "signatures": [export.SERVING_DEFAULT, export.SERVING_EXAMPLES],
            "accuracy": metrics.accuracy(check.probs["saved_model"], scored.labels),
            "max_difference_from_trained": difference,
            "latency_ms": scoring.latency_ms(lambda: serve(images=jpeg)),
        }
        if export.wants_tflite(config.export.tflite, config.model.backbone):
            facts["tflite"] = _tflite(config, keras_model, export_dir, test_files, classes, size, facts)
        extra = export.describe({**verdict, "export": facts}, fingerprint(prep), to_yaml(config))
        facts["size_bytes"] = export.publish(local, target, classes, extra)
        facts["fingerprint"] = export.content_fingerprint(local)  # what push will publish
        outputs.mark_owned(export_dir, EXPORT, sealed=True)
    say(f"exported {target} ({facts['size_bytes'] / 1e6:.1f} MB, test accuracy {facts['accuracy']:.4f})")
    return facts


def _tflite(
    config: Config,
    keras_model: Any,
    export_dir: str,
    test_files: list[str],
    classes: list[str],
    size: int,
    saved_model: dict[str, Any],
) -> dict[str, Any]:
    """Converts to TFLite, scores it on the test split, writes ``model.tflite`` + ``labels.txt``."""
    quantization = config.export.tflite_quantization
    say(f"converting to TensorFlow Lite ({quantization} quantization)")
    flatbuffer = export.convert_tflite(keras_model, size, quantization)
    lite = export.TFLiteClassifier(flatbuffer)
    scored = scoring.score({"tflite": lambda pixels, _: lite(pixels.numpy())}, test_files, size, 32, classes)
    one = np.zeros([1, size, size, 3], np.float32)
    path = storage.join(export_dir, "model.tflite")
    storage.write_bytes(path, flatbuffer)
    storage.write_text(storage.join(export_dir, export.LABELS_FILE), "\n".join(classes) + "\n")
    accuracy = metrics.accuracy(scored.probs["tflite"], scored.labels)
    say(
        f"TFLite: {len(flatbuffer) / 1e6:.2f} MB, test accuracy {accuracy:.4f} "
        f"(SavedModel {saved_model['accuracy']:.4f})"
    )
    return {
        "path": path,
        "quantization": quantization,
        "size_bytes": len(flatbuffer),
        "accuracy": accuracy,
        "saved_model_accuracy": saved_model["accuracy"],
        "latency_ms": scoring.latency_ms(lambda: lite(one)),
    }


def fingerprint(prep: PreprocessOutput) -> dict[str, Any]:
    """What the model was trained and tested on: a SHA-256 over every TFRecord shard (names
    and bytes, in order, each shard streamed in chunks) with the counts, classes and source."""
    prep_dir = prep.dir
    digest = hashlib.sha256()
    for split in ("train", "eval", "test"):
        for info in storage.list_files(storage.join(prep_dir, split)):
            if info.uri.endswith(schema.TFRECORD_SUFFIX):
                digest.update(f"{split}/{info.uri.rsplit('/', 1)[-1]}\n".encode())
                for chunk in storage.iter_chunks(info.uri):  # streamed: a shard is never held whole
                    digest.update(chunk)
    return {
        "sha256": digest.hexdigest(),
        "source": prep.summary.get("source"),
        "records": prep.summary["records"],
        "classes": prep.classes,
        "image_size": prep.image_size,
    }


def _report_data(
    config: Config,
    prep: PreprocessOutput,
    train_dir: str,
    results: dict[str, Any],
    verdict: dict[str, Any],
    scored: scoring.Scored,
    facts: dict[str, Any],
) -> dict[str, Any]:
    histories = {}
    for phase in PHASES:
        path = storage.join(train_dir, phase, "history.json")
        histories[phase] = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    exported = verdict.get("export") or {}
    return {
        "name": config.name,
        "run_dir": config.run_dir,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backbone": config.model.backbone,
        "image_size": prep.image_size,
        "classes": prep.classes,
        "preprocess": prep.summary,
        "histories": histories,
        "metrics": {
            "baseline": results["baseline"],
            "candidate": results["candidate"],
            "champion": results.get("champion"),
        },
        "verdict": verdict,
        "misclassified": scored.misclassified,
        "models": {
            **facts,
            "saved_model": {k: exported[k] for k in ("path", "size_bytes", "latency_ms")}
            if exported
            else None,
            "tflite": exported.get("tflite"),
        },
    }
