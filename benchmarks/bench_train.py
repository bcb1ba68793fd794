"""Training throughput: the training stage's ways of fitting against plain tf_keras fits.

Over 400 lines on purpose: four measurements that share one prepared dataset, model and
round loop, each pairing the stage's path with its plain baseline in the same round.

The beans photos (split folders) are preprocessed once, at ``--size`` px, into a temporary
run directory; the train split's records are also decoded once into a numpy array. Every
model is MobileNetV2 (``--alpha``, the real ImageNet weights file ``--weights``) with the
stage's head, batch ``--batch-size`` per replica, float32, no XLA (the stage's choices on a
CPU). Measured, each pair side by side in the same round (this machine's speed drifts by
tens of percent over minutes), ratios being the median of the per-round ratios:

1. Candidate throughput. The candidate phase as the stage runs it (``model.unfreeze_top``,
   ``model.compile_model``, ``fit`` on ``strategy.distribute_datasets_from_function`` of the
   stage's TFRecord input, with its backup (``phases.Backup``) and TensorBoard callbacks;
   validation left out, as the stage's own timer leaves it out), with the configured
   augmentation and without it, against a plain ``fit`` of the same model (same trainable
   layers, same compile) on the numpy images. The target figure is the one without
   augmentation: the plain fit does none, so only then is the work the same. The input keeps
   decoded or encoded images in memory as the stage decides (``stage.image_cache``; decoded
   for beans); the other choice is measured too (``stage_encoded``: what a dataset over
   ``train.image_cache_mb`` gets). The seconds of each epoch-end backup are noted (they are
   part of the stage's epochs), and the stage's rate is also given without them, to show how
   much of any gap they make.
2. Input pipeline. The stage's fit fed from TFRecords (``data.image_dataset``, training,
   repeating; as the stage caches, with and without augmentation, and with encoded images)
   against the same fit of the same model fed one fixed in-memory batch
   (``Dataset.from_tensors(...).repeat()``): the step time the input adds.
3. Baseline. Cached features (extract the frozen backbone's features once, as the stage
   does, then fit the head ``--baseline-epochs`` epochs on them) against the frozen
   classifier fitted the same epochs, steps and batch on the images (the backbone runs every
   epoch); both whole, from the first image to the last epoch's end.
4. Two workers. The rendered training Job's pods as ``python -m pipeline.cli train``
   processes on loopback (``tests.k8s_helpers.LocalWorkerGroup``: each pod's environment,
   TF_CONFIG derived from it, MultiWorkerMirroredStrategy) against a one-pod Job, same
   configuration, few epochs: efficiency = candidate images/s of two workers / (2 x that of
   one), from the summaries (whose rate includes the first epoch, tracing and all), and the
   same from wall times. Both workers must end with identical weights: the digests each
   worker records (``components.train.distribute.record_phase``). On a 2-core machine the
   two processes share the cores one process already uses, so this is a correctness set-up:
   reported, no target. ``--mw-no-eval`` leaves the eval split out (no validation, no exact
   evaluation).

Tracing is kept out of every in-process figure: each model is built once and warmed up with
a short fit (and one feature pass) first; the stage's variants share one model, which only
their input tells apart. Candidate rounds fit each variant ``--epochs`` epochs (default 3:
the phase runs several, and its first epoch fills the input's cache) and time from the end of
step ``--skip-steps`` (past the iterator's start-up) to the end of the last epoch, so the
epoch-end backups count as they do in the stage (each fit's but the last); the variants'
order rotates from round to round. Baseline rounds then time the two baseline variants back to back.

The result goes to ``--out`` as JSON (default ``runs/bench/train.json``) and to stdout.

Usage, from the repository root: python -m benchmarks.bench_train --beans ../shared/datasets/beans \\
    --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from components.config import Config, load_config, to_yaml  # noqa: E402
from components.preprocess import stage as preprocess_stage  # noqa: E402
from components.train import data, distribute, features, model, phases, stage  # noqa: E402
from tests.k8s_helpers import LocalWorkerGroup, WorkersFailed  # noqa: E402

STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[bench {time.perf_counter() - STARTED:5.0f} s] {message}", flush=True)


class StepClock(tf_keras.callbacks.Callback):
    """Wall time from the end of step ``skip`` to the end of the last epoch (put it last, so
    the other callbacks' epoch-end work, such as the stage's backups, counts)."""

    _supports_tf_logs = True  # the logs stay tensors: no extra host copies per step

    def __init__(self, skip: int) -> None:
        super().__init__()
        self.skip = skip
        self.steps = 0
        self.started = self.ended = 0.0
        self.backup_seconds = 0.0  # of the epoch-end backups inside the timed window

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.steps += 1
        if self.steps == self.skip:
            self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.ended = time.perf_counter()

    def rate(self, batch: int, without_backups: bool = False) -> float:
        """Images per second over the timed steps (optionally not counting the backups' time)."""
        seconds = self.ended - self.started - (self.backup_seconds if without_backups else 0.0)
        return (self.steps - self.skip) * batch / seconds


class TimedBackup(phases.Backup):
    """The stage's backup callback, also noting how long each epoch-end backup takes (in
    ``seconds``, and in ``clock`` when inside its timed window)."""

    def __init__(
        self, backup_dir: str, save_freq: Any, epochs: int, seconds: list[float], clock: StepClock
    ) -> None:
        super().__init__(backup_dir, save_freq, epochs)
        self.seconds, self.clock = seconds, clock

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not self.backs_up_after(epoch):  # no backup: nothing to time
            return
        started = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        self.seconds.append(time.perf_counter() - started)
        if self.clock.started:
            self.clock.backup_seconds += self.seconds[-1]


class Bench:
    """The data, configuration and strategy shared by every in-process measurement."""

    def __init__(self, cfg: Config, run_dir: str, steps: int, skip: int) -> None:
        self.cfg = cfg
        self.prep = os.path.join(run_dir, "preprocess")
        self.scratch = os.path.join(run_dir, "scratch")
        summary = json.load(open(os.path.join(self.prep, "summary.json")))
        self.classes = len(summary["classes"])
        self.size = cfg.model.image_size
        self.batch = cfg.train.batch_size
        self.files = data.record_files(self.prep, "train")
        # As the stage: decoded images in memory when they fit train.image_cache_mb.
        self.cache, self.cache_mib = stage.image_cache(cfg, stage.read_inputs(cfg), 1)
        self.steps = steps
        self.skip = skip
        self.placement = distribute.create_strategy(distribute.Cluster())
        self.jit = distribute.use_xla(cfg, self.placement.device)
        self.learning_rate = cfg.train.finetune_learning_rate or cfg.train.baseline_learning_rate / 10
        images, labels = [], []
        for x, y in data.image_dataset(self.files, self.size, 256):  # once, outside any timing
            images.append(x.numpy())
            labels.append(y.numpy())
        self.x, self.y = np.concatenate(images), np.concatenate(labels)
        if self.steps * self.batch > len(self.y):
            raise SystemExit(f"--steps-per-epoch {steps} x batch {self.batch} > {len(self.y)} train images")
        self.fits = 0
        self.backup_seconds: dict[str, list[float]] = {}
        self.unfrozen: dict[str, Any] = {}

    def classifier(self, phase: str) -> model.Classifier:
        """A fresh classifier with ``model`` compiled: for the ``candidate`` phase as the stage
        compiles it (top of the backbone unfrozen), or with the backbone frozen (``baseline``)."""
        m, t = self.cfg.model, self.cfg.train
        with self.placement.strategy.scope():
            clf = model.build_classifier(
                m.backbone,
                self.size,
                self.classes,
                weights=m.weights,
                alpha=m.alpha,
                dropout=m.dropout,
                seed=t.seed,
                name=self.cfg.name,
            )
            if phase == "candidate":
                self.unfrozen = model.unfreeze_top(clf, m.backbone, t.unfreeze)
                model.compile_model(clf.model, self.learning_rate, self.jit)
            else:
                model.compile_model(clf.model, t.baseline_learning_rate, self.jit)
        return clf

    def records_fn(
        self, augment: bool, cache: str
    ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
        """The candidate phase's ``train_fn`` (``data.training_input``), augmentation and the
        in-memory cache chosen."""
        return data.training_input(self.files, self.size, self.batch, self.cfg.train, cache, augment)

    def synthetic_fn(self, ictx: tf.distribute.InputContext) -> tf.data.Dataset:
        """One fixed batch of real images, in memory, repeated: an input that costs nothing."""
        batch = (tf.constant(self.x[: self.batch]), tf.constant(self.y[: self.batch]))
        return tf.data.Dataset.from_tensors(batch).repeat()

    def stage_fit(
        self, keras_model: Any, dataset_fn: Callable, epochs: int, steps: int, phase: str = "candidate"
    ) -> StepClock:
        """``fit`` as the stage's ``_fit`` calls it (validation aside: the stage times without it)."""
        self.fits += 1
        out = os.path.join(self.scratch, f"fit-{self.fits}")
        clock = StepClock(self.skip)
        callbacks = [
            TimedBackup(
                os.path.join(out, "backup"),
                self.cfg.train.backup_every_steps or "epoch",
                epochs,
                self.backup_seconds.setdefault(phase, []),
                clock,
            ),
            tf_keras.callbacks.TensorBoard(os.path.join(out, "logs"), profile_batch=0),
            clock,
        ]
        strategy = self.placement.strategy
        keras_model.fit(
            strategy.distribute_datasets_from_function(dataset_fn),
            epochs=epochs,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=0,
        )
        shutil.rmtree(out, ignore_errors=True)
        return clock

    def plain_fit(self, keras_model: Any, epochs: int, steps: int) -> StepClock:
        """A plain ``fit`` on the numpy images (whole batches only, as the stage's epochs)."""
        n = steps * self.batch
        clock = StepClock(self.skip)
        keras_model.fit(
            self.x[:n],
            self.y[:n],
            batch_size=self.batch,
            epochs=epochs,
            shuffle=True,
            verbose=0,
            callbacks=[clock],
        )
        return clock


# Candidate-phase variants (measurements 1 and 2): name -> how one fit runs.
VARIANTS: dict[str, Callable[[Bench, Any, int, int], StepClock]] = {
    "stage_augment": lambda b, m, e, s: b.stage_fit(m, b.records_fn(True, b.cache), e, s),
    "stage": lambda b, m, e, s: b.stage_fit(m, b.records_fn(False, b.cache), e, s),
    "stage_encoded": lambda b, m, e, s: b.stage_fit(m, b.records_fn(False, data.ENCODED), e, s),
    "plain_numpy": lambda b, m, e, s: b.plain_fit(m, e, s),
    "stage_synthetic": lambda b, m, e, s: b.stage_fit(m, b.synthetic_fn, e, s),
}


def extract_features(bench: Bench, extract: Any, width: int) -> features.Features:
    """The baseline phase's feature pass: each train image once, batches as the stage's, kept
    in memory."""
    dataset = data.image_dataset(bench.files, bench.size, phases.feature_batch_size(bench.batch))
    return features.Features.extract(extract, dataset, width)


def baseline_round(bench: Bench, extract: Any, head: Any, frozen: Any, epochs: int) -> dict[str, float]:
    """Seconds of the cached-feature baseline (features once + ``head`` on them) and of the
    ``frozen`` classifier fitted on the images (same epochs, steps and batch), back to back."""
    t = bench.cfg.train
    started = time.perf_counter()
    kept = extract_features(bench, extract, int(head.input_shape[-1]))
    feature_seconds = time.perf_counter() - started

    def head_fn(ictx: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = ictx.get_per_replica_batch_size(bench.batch)
        return kept.dataset(batch, training=True, repeat=True, seed=t.seed)

    bench.stage_fit(head, head_fn, epochs, bench.steps, "head")
    cached_seconds = time.perf_counter() - started
    head_seconds = cached_seconds - feature_seconds
    started = time.perf_counter()
    bench.stage_fit(frozen, bench.records_fn(False, bench.cache), epochs, bench.steps, "frozen")
    frozen_seconds = time.perf_counter() - started
    return {
        "baseline_cached_seconds": cached_seconds,
        "baseline_feature_seconds": feature_seconds,
        "baseline_head_seconds": head_seconds,
        "baseline_frozen_seconds": frozen_seconds,
    }


def in_process(bench: Bench, rounds: int, baseline_rounds: int, epochs: int, baseline_epochs: int) -> dict:
    """Measurements 1-3: builds and warms the models, then runs the rounds. The stage's
    variants share one candidate model (only their input differs); the plain fit has its own
    (tf_keras cannot fit a model without BackupAndRestore once a fit with it has ended)."""
    stage_model, plain_model = bench.classifier("candidate").model, bench.classifier("candidate").model
    baseline = bench.classifier("baseline")
    # As the stage's baseline phase: features from a local copy of the frozen model, and the
    # head compiled as a model of its own around the shared head layers.
    extract = model.feature_extractor(baseline)
    with bench.placement.strategy.scope():
        head = model.head_trainer(baseline, bench.cfg.train.baseline_learning_rate, bench.jit)
    say("models built; warming up (tracing)")
    models = {name: plain_model if name == "plain_numpy" else stage_model for name in VARIANTS}
    for name, run in VARIANTS.items():
        run(bench, models[name], 1, 2)
    baseline_round(bench, extract, head, baseline.model, 1)
    names = list(VARIANTS)
    results: dict[str, list[dict[str, float]]] = {"candidate": [], "baseline": []}
    for i in range(rounds):
        rates: dict[str, float] = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:
            clock = VARIANTS[name](bench, models[name], epochs, bench.steps)
            rates[name] = clock.rate(bench.batch)
            if name == "stage":
                rates["stage_without_backups"] = clock.rate(bench.batch, without_backups=True)
        say(
            f"candidate round {i + 1}/{rounds}, images/s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
        )
        results["candidate"].append(rates)
    for i in range(baseline_rounds):
        seconds = baseline_round(bench, extract, head, baseline.model, baseline_epochs)
        say(
            f"baseline round {i + 1}/{baseline_rounds}, s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
        )
        results["baseline"].append(seconds)
    return results


def cli_train(config_path: str, folder: str, workers: int, timeout: float) -> dict[str, Any]:
    """The training Job's ``workers`` pods as local processes (``LocalWorkerGroup``), their
    logs and records in ``folder``; returns the chief's summary, the wall time and every
    worker's candidate weights digest (None for a worker that recorded none).

    Raises:
        WorkersFailed: a process failed (the others are then stopped), or the run took
            longer than ``timeout`` seconds.
    """
    group = LocalWorkerGroup(config_path, workers, folder)
    group.start()
    group.wait(timeout)
    run_dir = load_config(config_path, []).run_dir
    summary = json.load(open(os.path.join(run_dir, "train", "summary.json")))
    digests = [r.get("candidate", {}).get("weights_sha256") for r in group.weights()]
    return {"summary": summary, "wall": group.seconds, "digests": digests}


def copy_preprocessed(prep: str, run_dir: str, keep_eval: bool) -> None:
    """The preprocessing outputs under ``run_dir``; without ``keep_eval`` the summary lists
    no eval records, so the stage skips validation and the chief's exact evaluation."""
    target = os.path.join(run_dir, "preprocess")
    shutil.copytree(prep, target)
    if not keep_eval:
        path = os.path.join(target, "summary.json")
        summary = json.load(open(path))
        summary["records"]["eval"] = 0
        with open(path, "w") as f:
            json.dump(summary, f)


def multi_worker(
    settings: list[str], work: str, prep: str, rounds: int, timeout: float, keep_eval: bool
) -> dict:
    """Measurement 4: one CLI process against two, back to back, ``rounds`` times; each run
    with the configuration of ``settings`` (``--set`` overrides) and its own run directory."""
    cfg = load_config(None, [*settings, f"run_dir={work}"])  # each run sets its own run_dir
    result: dict[str, Any] = {
        "baseline_epochs": cfg.train.baseline_epochs,
        "finetune_epochs": cfg.train.finetune_epochs,
        "eval_split": keep_eval,
    }
    runs = []
    for i in range(rounds):
        run = {}
        for workers in (1, 2):
            folder = os.path.join(work, f"cli-{workers}-{i}")
            run_dir = os.path.join(folder, "run")
            copy_preprocessed(prep, run_dir, keep_eval)
            config_path = os.path.join(folder, "config.yaml")
            with open(config_path, "w") as f:
                f.write(to_yaml(load_config(None, [*settings, f"run_dir={run_dir}"])))
            say(f"round {i + 1}/{rounds}: CLI training with {workers} worker(s)")
            try:
                run[workers] = cli_train(config_path, folder, workers, timeout)
            except WorkersFailed as e:
                say(str(e))
                return {**result, "error": str(e)}
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        runs.append(run)

    def med(fn: Callable[[dict], float]) -> float:
        return statistics.median(fn(r) for r in runs)

    def ips(r: dict, w: int) -> float:
        return r[w]["summary"]["candidate"]["images_per_second"]

    for workers, key in ((1, "one_worker"), (2, "two_workers")):
        summary = runs[-1][workers]["summary"]
        result[key] = {
            "strategy": summary["strategy"],
            "global_batch_size": summary["global_batch_size"],
            "candidate_steps": summary["candidate"]["steps"],
            "candidate_images_per_second": med(lambda r, w=workers: ips(r, w)),
            "baseline_feature_seconds": med(
                lambda r, w=workers: r[w]["summary"]["baseline"]["feature_seconds"]
            ),
            "wall_seconds": round(med(lambda r, w=workers: r[w]["wall"]), 2),
        }
    result["two_workers"]["same_weights"] = all(
        len(set(r[2]["digests"])) == 1 and None not in r[2]["digests"] for r in runs
    )
    result["efficiency"] = round(med(lambda r: ips(r, 2) / (2 * ips(r, 1))), 3)
    result["efficiency_wall"] = round(med(lambda r: r[1]["wall"] / (2 * r[2]["wall"])), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--beans", required=True, help="the beans photos (split folders)")
    parser.add_argument("--weights", required=True, help="MobileNetV2 ImageNet weights file (no top)")
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="candidate-phase rounds; medians are reported")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each candidate-phase fit in a round")
    parser.add_argument("--skip-steps", type=int, default=3, help="untimed first steps of each such fit")
    parser.add_argument(
        "--steps-per-epoch", type=int, default=0, help="0: the whole train split, as the stage"
    )
    parser.add_argument("--baseline-rounds", type=int, default=3)
    parser.add_argument("--baseline-epochs", type=int, default=5)
    parser.add_argument("--mw-rounds", type=int, default=1, help="rounds of the CLI runs (0: skip them)")
    parser.add_argument("--mw-baseline-epochs", type=int, default=1)
    parser.add_argument("--mw-finetune-epochs", type=int, default=3)
    parser.add_argument("--mw-timeout", type=float, default=300.0, help="seconds per CLI run")
    parser.add_argument(
        "--mw-no-eval",
        action="store_true",
        help="leave the eval split out of the CLI runs (no validation, no exact evaluation)",
    )
    parser.add_argument("--out", default="runs/bench/train.json", help="where the JSON result goes")
    args = parser.parse_args()

    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="bench-train-")
    try:
        run_dir = os.path.join(work, "run")
        cfg = load_config(
            None,
            [
                f"data.source={os.path.abspath(args.beans)}",
                f"run_dir={run_dir}",
                f"model.image_size={args.size}",
                f"model.alpha={args.alpha}",
                f"model.weights={os.path.abspath(args.weights)}",
                "preprocess.num_workers=1",
                f"train.batch_size={args.batch_size}",
            ],
        )
        say(f"preprocessing {args.beans} at {args.size} px into {run_dir}")
        preprocess_stage.run(cfg)
        num_train = json.load(open(os.path.join(run_dir, "preprocess", "summary.json")))["records"]["train"]
        bench = Bench(cfg, run_dir, args.steps_per_epoch or num_train // args.batch_size, args.skip_steps)
        say("building the models")
        rounds = in_process(bench, args.rounds, args.baseline_rounds, args.epochs, args.baseline_epochs)

        def med(key: str) -> float:
            return statistics.median(
                r[key] for r in rounds["baseline" if key.startswith("baseline") else "candidate"]
            )

        def ratio(fn: Callable[[dict[str, float]], float], part: str = "candidate") -> float:
            return round(statistics.median(fn(r) for r in rounds[part]), 3)  # median of per-round ratios

        def step_ms(name: str) -> float:
            return round(1000 * bench.batch / med(name), 1)

        def backup_s(phase: str) -> float | None:  # median seconds of one epoch-end backup
            seconds = bench.backup_seconds.get(phase)  # none in one-epoch fits: no backup to time
            return round(statistics.median(seconds), 3) if seconds else None

        result: dict[str, Any] = {
            "backbone": f"{cfg.model.backbone} alpha {cfg.model.alpha}",
            "weights": os.path.basename(args.weights),
            "image_size": args.size,
            "batch_size": args.batch_size,
            "train_images": num_train,
            "steps_per_epoch": bench.steps,
            "cpu_cores": os.cpu_count(),
            "device": bench.placement.device,
            "xla": bench.jit,
            "image_cache": bench.cache,
            "decoded_mib": round(bench.cache_mib, 1),
            "candidate": {
                "rounds": args.rounds,
                "epochs_per_fit": args.epochs,
                "untimed_steps_per_fit": args.skip_steps,
                "unfrozen": bench.unfrozen,
                "stage_images_per_second": round(med("stage"), 1),
                "stage_augment_images_per_second": round(med("stage_augment"), 1),
                "stage_encoded_images_per_second": round(med("stage_encoded"), 1),
                "plain_numpy_images_per_second": round(med("plain_numpy"), 1),
                "stage_vs_plain": ratio(lambda r: r["stage"] / r["plain_numpy"]),
                "stage_augment_vs_plain": ratio(lambda r: r["stage_augment"] / r["plain_numpy"]),
                "stage_encoded_vs_plain": ratio(lambda r: r["stage_encoded"] / r["plain_numpy"]),
                "stage_epoch_seconds": round(bench.steps * bench.batch / med("stage"), 2),
                "stage_backup_seconds_per_epoch": backup_s("candidate"),
                "stage_without_backups_vs_plain": ratio(
                    lambda r: r["stage_without_backups"] / r["plain_numpy"]
                ),
            },
            "input_pipeline": {
                "tfrecord_step_ms": step_ms("stage"),
                "tfrecord_augment_step_ms": step_ms("stage_augment"),
                "tfrecord_encoded_step_ms": step_ms("stage_encoded"),
                "synthetic_step_ms": step_ms("stage_synthetic"),
                "tfrecord_vs_synthetic": ratio(lambda r: r["stage_synthetic"] / r["stage"]),
                "tfrecord_augment_vs_synthetic": ratio(lambda r: r["stage_synthetic"] / r["stage_augment"]),
                "tfrecord_encoded_vs_synthetic": ratio(lambda r: r["stage_synthetic"] / r["stage_encoded"]),
            },
            "baseline": {
                "rounds": args.baseline_rounds,
                "epochs": args.baseline_epochs,
                "cached_seconds": round(med("baseline_cached_seconds"), 2),
                "cached_feature_seconds": round(med("baseline_feature_seconds"), 2),
                "cached_head_seconds": round(med("baseline_head_seconds"), 2),
                "head_backup_seconds_per_epoch": backup_s("head"),
                "frozen_backbone_seconds": round(med("baseline_frozen_seconds"), 2),
                "frozen_backup_seconds_per_epoch": backup_s("frozen"),
                "cached_speedup": ratio(
                    lambda r: r["baseline_frozen_seconds"] / r["baseline_cached_seconds"], "baseline"
                ),
            },
        }
        if args.mw_rounds:
            mw_settings = [
                f"data.source={cfg.data.source}",
                f"model.image_size={args.size}",
                f"model.alpha={args.alpha}",
                f"model.weights={cfg.model.weights}",
                f"train.batch_size={args.batch_size}",
                f"train.baseline_epochs={args.mw_baseline_epochs}",
                f"train.finetune_epochs={args.mw_finetune_epochs}",
            ]
            result["multi_worker"] = multi_worker(
                mw_settings,
                work,
                os.path.join(run_dir, "preprocess"),
                args.mw_rounds,
                args.mw_timeout,
                not args.mw_no_eval,
            )
        result["per_round"] = {
            part: [{k: round(v, 2) for k, v in r.items()} for r in values] for part, values in rounds.items()
        }
        result["targets"] = {
            "candidate stage_vs_plain >= 0.9 (no augmentation: the target figure)": (
                result["candidate"]["stage_vs_plain"] >= 0.9
            ),
            "input tfrecord_vs_synthetic <= 1.1": result["input_pipeline"]["tfrecord_vs_synthetic"] <= 1.1,
            "baseline cached_speedup >= 5": result["baseline"]["cached_speedup"] >= 5,
        }
        result["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
