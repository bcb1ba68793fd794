"""The two training phases, run on every worker under the strategy chosen by the stage.

* ``baseline_phase``: the head on cached features of the frozen backbone.
* ``candidate_phase``: the top of the backbone unfrozen (BatchNorm frozen), a lower learning
  rate, augmented images.

Each phase fits with backup (preemption), TensorBoard and timing callbacks, evaluates exactly
on the chief, and saves its model, history and result (every worker saves; only the chief's
copy is kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from components.config import Config
from components.core import scratch, storage
from components.train import data, distribute, features, model


@dataclass(frozen=True)
class Inputs:
    """What the preprocessing stage produced, as the trainer needs it."""

    classes: list[str]
    image_size: int
    train_files: list[str]
    eval_files: list[str]
    num_train: int
    num_eval: int
    # SHA-256 over the class list, image size and the train and eval shards' recorded digests:
    # what a resume must match (None: the shards' digests were not recorded; never resume).
    digest: str | None = None
    record_bytes: int = 0  # the train and eval TFRecords' bytes: what an encoded cache holds


@dataclass(frozen=True)
class Run:
    """One training run's fixed facts, passed to each phase."""

    config: Config
    cluster: distribute.Cluster
    placement: distribute.Placement
    inputs: Inputs
    out: str
    global_batch: int
    steps_per_epoch: int
    jit_compile: bool
    policy: str
    cache: str  # what the candidate's input keeps in memory (data.DECODED, ...; stage.image_cache)

    def say(self, message: str) -> None:
        """Progress on the console, from the chief only (other workers stay quiet)."""
        if self.cluster.is_chief:
            print(f"[train] {message}", flush=True)

    @property
    def verbose(self) -> int:
        if not self.cluster.is_chief:
            return 0
        return 1 if sys.stdout.isatty() else 2

    def learning_rate(self, base: float) -> float:
        return base * self.placement.replicas if self.config.train.scale_learning_rate else base


def baseline_phase(ctx: Run, clf: model.Classifier) -> dict[str, Any]:
    """Phase 1: the head on cached features of the frozen backbone."""
    result_path = storage.join(ctx.out, "baseline", "result.json")
    if storage.exists(result_path):
        with storage.local_copy(storage.join(ctx.out, "baseline", "model.keras")) as path:
            clf.model.load_weights(path)
        ctx.say("baseline: already trained in this run directory, loaded")
        return json.loads(storage.read_text(result_path))
    t = ctx.config.train
    started = time.perf_counter()
    width = int(clf.head.input_shape[-1])
    per_worker = -(-ctx.inputs.num_train // ctx.cluster.num_workers) + ctx.inputs.num_eval
    on_disk, where = features.placement(per_worker, width, t.image_cache_mb)
    ctx.say(f"baseline: computing frozen {ctx.config.model.backbone} features once (kept {where})")
    extract = model.feature_extractor(clf, on_tpu=ctx.placement.device == "tpu")
    batch = feature_batch_size(t.batch_size)

    def computed(files: list[str], shard: data.Shard) -> features.Features:
        images = data.image_dataset(files, ctx.inputs.image_size, batch, shard=shard)
        return features.Features.extract(
            extract, images, width, scratch.mkdtemp("features") if on_disk else None
        )

    train_f = computed(ctx.inputs.train_files, data.Shard(ctx.cluster.num_workers, ctx.cluster.worker_index))
    eval_f = computed(ctx.inputs.eval_files, data.Shard()) if ctx.inputs.eval_files else None
    try:
        feature_seconds = time.perf_counter() - started
        ctx.say(f"baseline: {len(train_f)} train features in {feature_seconds:.1f} s; training the head")
        learning_rate = ctx.learning_rate(t.baseline_learning_rate)
        with ctx.placement.strategy.scope():
            head = model.head_trainer(clf, learning_rate, ctx.jit_compile)

        def train_fn(ictx: tf.distribute.InputContext) -> tf.data.Dataset:
            batch = ictx.get_per_replica_batch_size(ctx.global_batch)
            return train_f.dataset(
                batch, training=True, repeat=True, seed=t.seed, shuffle_buffer=t.shuffle_buffer
            )

        def eval_fn(ictx: tf.distribute.InputContext) -> tf.data.Dataset:
            batch = ictx.get_per_replica_batch_size(ctx.global_batch)
            part = (ictx.input_pipeline_id, ictx.num_input_pipelines)
            return eval_f.dataset(batch, training=False, repeat=_counted_validation(ctx), part=part)

        history, timer = _fit(
            ctx, head, "baseline", train_fn, eval_fn if eval_f is not None else None, t.baseline_epochs
        )
        evaluated = (
            _exact_metrics(clf.head, eval_f.batches())
            if eval_f is not None and ctx.cluster.is_chief
            else None
        )
    finally:
        for kept in (train_f, eval_f):
            if kept is not None:
                kept.close()
    result = _result(ctx, head, history, t.baseline_epochs, learning_rate, started, evaluated)
    result["feature_seconds"] = round(feature_seconds, 2)
    result["features"] = train_f.where
    result["steps_run"] = timer.steps
    result["images_per_second"] = _rate(ctx, result, feature_seconds + timer.train_seconds)
    _save(ctx, clf.model, "baseline", result, history)
    return result


def candidate_phase(ctx: Run, clf: model.Classifier) -> dict[str, Any]:
    """Phase 2: fine-tune the top of the backbone on augmented images."""
    t = ctx.config.train
    started = time.perf_counter()
    unfrozen = model.unfreeze_top(clf, ctx.config.model.backbone, t.unfreeze)
    learning_rate = ctx.learning_rate(t.finetune_learning_rate or t.baseline_learning_rate / 10)
    schedule = model.learning_rate_schedule(
        learning_rate, t.finetune_schedule, t.finetune_epochs * ctx.steps_per_epoch
    )
    with ctx.placement.strategy.scope():
        model.compile_model(clf.model, schedule, ctx.jit_compile)
    ctx.say(
        f"candidate: fine-tuning from layer {unfrozen['from_layer']} ({unfrozen['trainable_layers']} layers, "
        f"{unfrozen['frozen_batchnorm']} BatchNorm layers kept frozen) at learning rate {learning_rate:g}"
        + (f", {t.finetune_schedule} decay to 0" if t.finetune_schedule != "constant" else "")
    )
    size = ctx.inputs.image_size

    train_fn = data.training_input(ctx.inputs.train_files, size, ctx.global_batch, t, ctx.cache)

    def eval_fn(ictx: tf.distribute.InputContext) -> tf.data.Dataset:
        return data.image_dataset(
            ctx.inputs.eval_files,
            size,
            ictx.get_per_replica_batch_size(ctx.global_batch),
            shard=data.Shard(ictx.num_input_pipelines, ictx.input_pipeline_id),
            repeat=_counted_validation(ctx),
            cache=ctx.cache,
        )

    history, timer = _fit(
        ctx, clf.model, "candidate", train_fn, eval_fn if ctx.inputs.eval_files else None, t.finetune_epochs
    )
    evaluated = None
    if ctx.inputs.eval_files:
        snapshot = model.local_copy(clf.model)  # on every worker: the weight read is collective
        if ctx.cluster.is_chief:
            evaluated = _exact_metrics(snapshot, data.image_dataset(ctx.inputs.eval_files, size, 64))
    result = _result(ctx, clf.model, history, t.finetune_epochs, learning_rate, started, evaluated)
    result["steps_run"] = timer.steps
    result["images_per_second"] = _rate(ctx, result, timer.train_seconds)
    result["unfrozen"] = unfrozen
    result["learning_rate_schedule"] = t.finetune_schedule
    _save(ctx, clf.model, "candidate", result, history)
    return result


def feature_batch_size(batch_size: int) -> int:
    """Images per call of the feature pass: an inference step keeps no activations for a
    backward pass, so 4x the training batch fits wherever training does, and on a CPU
    larger batches run the forward pass faster."""
    return max(64, 4 * batch_size)


class Backup(tf_keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` without the backup at the end of the last epoch: ``fit`` deletes
    the backup as it returns, so writing that one would only cost time (a larger share of
    short epochs). Every worker skips the same epoch, so the collective reads of a save stay
    in step."""

    def __init__(self, backup_dir: str, save_freq: int | str, epochs: int) -> None:
        super().__init__(backup_dir, save_freq=save_freq)
        self.epochs = epochs

    def backs_up_after(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (0-based) runs ``BackupAndRestore``'s epoch-end work:
        every epoch's but the last's."""
        return epoch < self.epochs - 1

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.backs_up_after(epoch):
            super().on_epoch_end(epoch, logs)


class _Timer(tf_keras.callbacks.Callback):
    """Seconds spent training, validation excluded (for images/s), and the steps this
    process ran (fewer than planned when it resumed from a backup).

    Epoch-level hooks only: a batch hook would make Keras convert the logs, and so wait for
    the device, after every step. Goes after BackupAndRestore, which restores the optimizer's
    step counter in its own ``on_train_begin``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self._first_step = 0
        self.train_seconds = 0.0
        self._epoch_started = 0.0
        self._test_seconds = 0.0
        self._test_started = 0.0

    def on_train_begin(self, logs: Any = None) -> None:
        self._first_step = int(self.model.optimizer.iterations.numpy())

    def on_train_end(self, logs: Any = None) -> None:
        self.steps = int(self.model.optimizer.iterations.numpy()) - self._first_step

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch_started, self._test_seconds = time.perf_counter(), 0.0

    def on_test_begin(self, logs: Any = None) -> None:
        self._test_started = time.perf_counter()

    def on_test_end(self, logs: Any = None) -> None:
        self._test_seconds += time.perf_counter() - self._test_started

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.train_seconds += time.perf_counter() - self._epoch_started - self._test_seconds


def _fit(
    ctx: Run, keras_model: Any, phase: str, train_fn: Any, eval_fn: Any, epochs: int
) -> tuple[dict, _Timer]:
    """``fit`` on distributed datasets with backup, TensorBoard and timing callbacks; on
    several workers validation repeats, so every worker runs the same number of steps."""
    t = ctx.config.train
    strategy = ctx.placement.strategy
    backup_dir = storage.join(ctx.out, "backup", phase)
    if tf.io.gfile.exists(storage.join(backup_dir, "chief", "checkpoint")):
        ctx.say(f"{phase}: resuming from the backup in {backup_dir}")
    timer = _Timer()
    callbacks = [
        Backup(backup_dir, t.backup_every_steps or "epoch", epochs),
        tf_keras.callbacks.TensorBoard(storage.join(ctx.out, "logs", phase), profile_batch=0),
        timer,
    ]
    if t.early_stopping_patience and eval_fn is not None:
        callbacks.append(
            tf_keras.callbacks.EarlyStopping(
                "val_loss", patience=t.early_stopping_patience, restore_best_weights=True
            )
        )
    validation, validation_steps = None, None
    if eval_fn is not None:
        validation = strategy.distribute_datasets_from_function(eval_fn)
        if _counted_validation(ctx):
            validation_steps = max(1, math.ceil(ctx.inputs.num_eval / ctx.global_batch))
    history = keras_model.fit(
        strategy.distribute_datasets_from_function(train_fn),
        epochs=epochs,
        steps_per_epoch=ctx.steps_per_epoch,
        validation_data=validation,
        validation_steps=validation_steps,
        callbacks=callbacks,
        verbose=ctx.verbose,
    )
    return {k: [float(v) for v in values] for k, values in history.history.items()}, timer


def _counted_validation(ctx: Run) -> bool:
    """Whether validation during ``fit`` runs a set number of steps over repeated eval data:
    under every strategy but the default one. Keras refuses a distributed dataset without a
    step count (several local GPUs, a TPU), and on several workers all must run the same
    number of steps. The eval metrics in summary.json are exact either way (_exact_metrics)."""
    return ctx.placement.name != "default"


def _exact_metrics(keras_model: Any, batches: Any) -> dict[str, float]:
    """Loss and accuracy over every eval example exactly once (chief only: plain calls,
    no collectives, so no example is repeated or dropped as in distributed validation)."""
    predict = tf.function(lambda x: keras_model(x, training=False), reduce_retracing=True)
    total, loss, correct = 0, 0.0, 0
    for x, y in batches:
        for start in range(0, len(y), 256):
            probs = predict(x[start : start + 256]).numpy().astype(np.float64)
            labels = np.asarray(y[start : start + 256])
            picked = probs[np.arange(len(labels)), labels]
            loss += float(-np.log(np.clip(picked, 1e-7, 1.0)).sum())
            correct += int((probs.argmax(axis=1) == labels).sum())
            total += len(labels)
    return {"loss": round(loss / total, 6), "accuracy": round(correct / total, 6), "examples": total}


def _result(
    ctx: Run,
    keras_model: Any,
    history: dict,
    epochs: int,
    learning_rate: float,
    started: float,
    evaluated: Any,
) -> dict[str, Any]:
    """One phase's summary; ``images_per_second`` is filled in by the phase (see _rate)."""
    epochs_run = len(history.get("loss", []))
    last = {k: v[-1] for k, v in history.items() if v}
    return {
        "epochs": epochs,
        "epochs_run": epochs_run,
        "steps": int(keras_model.optimizer.iterations.numpy()),
        "planned_steps": epochs * ctx.steps_per_epoch,
        "steps_per_epoch": ctx.steps_per_epoch,
        "learning_rate": learning_rate,
        "train": {"loss": last.get("loss"), "accuracy": last.get("accuracy")},
        "eval": evaluated,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _rate(ctx: Run, result: dict[str, Any], seconds: float) -> float:
    """Images trained per second of this run's training work: the steps this process ran
    times the global batch, over the fit time without validation (plus, for the baseline,
    the feature extraction)."""
    images = result["steps_run"] * ctx.global_batch
    return round(images / max(seconds, 1e-9), 1)


def _save(ctx: Run, keras_model: Any, phase: str, result: dict, history: dict) -> None:
    """Every worker saves (variables that sync on read need all of them); only the chief's
    copy is published, others are deleted. Every worker records the digest of its weights
    where ``FINETUNE_WORKER_RECORDS`` says (``distribute.record_phase``); the chief also in
    ``result.json``, which goes last: it marks the phase done."""
    tmp = scratch.mkdtemp(phase)
    try:
        path = os.path.join(tmp, "model.keras")
        model.float32_copy(keras_model).save(path)  # served as float32, whatever it trained in
        digest = weights_digest(keras_model)
        ctx.say(f"{phase}: weights sha256 {digest}")
        distribute.record_phase(ctx.cluster, phase, {"weights_sha256": digest, "steps": result["steps"]})
        if ctx.cluster.is_chief:
            target = storage.join(ctx.out, phase)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(target, "model.keras"), f.read())
            storage.write_text(storage.join(target, "history.json"), json.dumps(history, indent=2) + "\n")
            result["weights_sha256"] = digest
            storage.write_text(storage.join(target, "result.json"), json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weights_digest(keras_model: Any) -> str:
    """SHA-256 of every weight's bytes: equal on all workers when they agree exactly."""
    digest = hashlib.sha256()
    for weight in keras_model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()
