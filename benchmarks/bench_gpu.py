"""The trainer's accelerator path on a GPU (issue #20): one run, one JSON result, one table.

Over 400 lines on purpose: four measurements that share one preprocessed dataset, one child
process per backbone and one result, plus the CPU smoke mode that runs every code path.

Measured, in this order (the preprocessing of the beans comes first: sections 2 and 3 read
its TFRecords):

1. Synthetic input (``synthetic``). One child process per backbone (ResNet50 and MobileNetV2
   alpha 1.0, random weights, 224 px) creates the strategy as the stage does
   (``distribute.create_strategy``), then, per dtype policy (float32, mixed_float16) and XLA
   setting, builds the classifier through the project's own code (``model.build_classifier``
   in the strategy's scope, ``model.unfreeze_top`` at ``configs/beans.yaml``'s
   ``train.unfreeze``, ``model.compile_model`` with the stage's learning-rate schedule) and
   runs Keras's training function, the one ``fit`` runs each step, on one batch of random
   pixels made on each replica's device: no input pipeline, no copy to the device. Per-replica
   batch 128, then 256 (an out-of-memory is recorded and the run goes on). Each cell:
   ``--warmup-steps`` untimed steps (tracing, XLA compilation), then ``--steps`` timed ones,
   up to reading the last loss; the loss must be finite and the function must not retrace
   while timed. The cells the targets need run first and always: the stage's policy and XLA
   setting (``precision.choose``, ``distribute.use_xla``), then the other policy at that XLA
   setting, at the first batch. The rest (the other XLA setting, then the larger batch) run
   while the backbone's share of ``--budget`` lasts; those left are recorded as skipped.
2. Real input (``real_input``). In the same child, on the model of the stage's cell at the
   first batch: the same training function fed, as the candidate phase feeds it, by
   ``strategy.distribute_datasets_from_function`` of ``data.image_dataset`` (training,
   repeating, the configuration's augmentation) over the beans TFRecords at 224 px, with the
   decoded-image cache and without it (``data.DECODED``, ``data.NO_CACHE``); an epoch's steps
   untimed first (the cache fills), then ``--real-steps`` timed. Images/s and the ratio to the
   synthetic rate of the same model, measured again right after. The input pipeline alone
   (iterated with no model: cached, cached without augmentation, uncached) names the step
   that limits a ratio under 0.9. Then a few steps under ``tf.profiler.experimental``: the
   trace stays in the work folder (``profile/``), with a summary (time per event name of
   each device stream and host thread plane) there and in the result.
3. The stage (``stage``): ``finetune preprocess``, ``train`` and ``evaluate`` as subprocesses
   (``python -m pipeline.cli``) with ``configs/beans.yaml`` and ``--weights`` (a MobileNetV2
   ImageNet no-top .h5; alpha from its name): seconds per fine-tuning epoch, the policy, XLA,
   strategy, replicas and device the stage chose (train/summary.json), whether every loss of
   both phases is finite, and the gate's verdict (evaluate/verdict.json).
4. Distribution (``distribution``): the GPUs TensorFlow sees, and the strategy and replicas of
   each child of (1) and of the stage (MirroredStrategy across every visible GPU; the default
   strategy on one). Images/s are global: per-replica batch x replicas.

Targets (``targets``), each beside what was reached, ``met`` null when not measured, in
smoke mode, on a CPU, or (the absolute rate) on a GPU other than an H100: ResNet50
mixed_float16 + XLA >= 2,400 images/s per GPU synthetic; real input >= 0.9x synthetic for
ResNet50 and MobileNetV2 (with the cache the stage chooses); mixed_float16 >= 2x float32
for ResNet50 (the stage's XLA setting, per-replica batch 128).

``--smoke`` runs all four on the CPU (GPUs hidden): MobileNetV2 alpha 0.35 at 32 px, batch 4,
2 steps, random weights, 48 generated images (``tests.train_helpers.make_colour_images``)
instead of the beans, one epoch per phase. Without ``--smoke`` it exits 2 where TensorFlow
sees no GPU.

Result: ``--out`` (default ``runs/bench/gpu.json``) and stdout; the table on stderr. A part
that fails (a child, a cell other than by running out of memory, the real input, the stage) is
recorded with its error and the rest goes on; the exit code is then 1, after the result is
written.

Usage, from the repository root, on a GPU machine (aimed at under 8 minutes on one H100):
    python -m benchmarks.bench_gpu --beans ../shared/datasets/beans \\
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
    python -m benchmarks.bench_gpu --smoke     # the harness, on this CPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks.common import (
    ROOT,
    StageFailed,
    add_work_options,
    finetune,
    mobilenet_v2_alpha,
    say,
    work_folder,
    write_result,
)

BEANS_CONFIG = os.path.join(ROOT, "configs", "beans.yaml")
POLICIES = ("float32", "mixed_float16")
RESNET_TARGET = 2400.0  # images/s per GPU, ResNet50 mixed_float16 + XLA, synthetic, one H100
INPUT_TARGET = 0.9  # real input over synthetic
MIXED_TARGET = 2.0  # mixed_float16 over float32, ResNet50
NO_GPU = (
    "bench_gpu: error: TensorFlow sees no GPU; run this on a GPU machine, "
    "or with --smoke to run the harness on the CPU"
)
FULL = {
    "backbones": "resnet50,mobilenet_v2:1.0",
    "image_size": 224,
    "batches": "128,256",
    "steps": 30,
    "warmup_steps": 5,
    "real_steps": 40,
    "profile_steps": 5,
    "budget": 240.0,
}
SMOKE = {
    "backbones": "mobilenet_v2:0.35",
    "image_size": 32,
    "batches": "4",
    "steps": 2,
    "warmup_steps": 1,
    "real_steps": 2,
    "profile_steps": 2,
    "budget": 600.0,
}


def label(backbone: str, alpha: float | None) -> str:
    return backbone if alpha is None else f"{backbone} alpha {alpha}"


def parse_backbones(text: str) -> list[dict[str, Any]]:
    """``resnet50,mobilenet_v2:1.0`` -> [{backbone, alpha (None: not given)}, ...]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, alpha = part.partition(":")
        out.append({"backbone": name, "alpha": float(alpha) if alpha else None})
    return out


# ---------------------------------------------------------------- child: sections 1 and 2


class OnDevice:
    """Yields one batch forever. Keras's training function reads its iterator when traced,
    so every step trains on these same tensors, made on the replicas' devices beforehand."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __iter__(self) -> OnDevice:
        return self

    def __next__(self) -> Any:
        return self.batch


class Child:
    """One backbone's cells (section 1) and real-input runs (section 2), in this process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import tensorflow as tf

        from components.config import load_config
        from components.train import distribute, precision, stage

        self.tf, self.spec = tf, spec
        self.placement = distribute.create_strategy(distribute.Cluster())  # the first TensorFlow call
        self.cfg = load_config(BEANS_CONFIG, spec["overrides"])
        self.inputs = stage.read_inputs(self.cfg)  # the TFRecords preprocessed for sections 2 and 3
        self.classes = len(self.inputs.classes)
        device = self.placement.device
        self.chosen = precision.choose(
            self.cfg.train.mixed_precision, device, self.cfg.model.backbone, precision.cpu_features()
        )
        self.xla = distribute.use_xla(self.cfg, device)
        self.size = self.cfg.model.image_size
        self.models: dict[tuple[str, bool], Any] = {}
        self.iterators: dict[tuple[str, bool, int], OnDevice] = {}

    def build(self, policy: str, xla: bool) -> Any:
        """The candidate phase's model under ``policy``, compiled as the stage compiles it."""
        from components.train import model

        m, t = self.cfg.model, self.cfg.train
        started = time.perf_counter()
        with model.global_policy(policy), self.placement.strategy.scope():
            clf = model.build_classifier(
                m.backbone,
                self.size,
                self.classes,
                weights="none",
                alpha=m.alpha,
                dropout=m.dropout,
                seed=t.seed,
            )
            model.unfreeze_top(clf, m.backbone, t.unfreeze)
            rate = t.finetune_learning_rate or t.baseline_learning_rate / 10
            global_batch = self.spec["batches"][0] * self.placement.replicas
            planned = t.finetune_epochs * max(1, self.inputs.num_train // global_batch)  # as the stage
            schedule = model.learning_rate_schedule(rate, t.finetune_schedule, planned)
            model.compile_model(clf.model, schedule, xla)
        self.models[(policy, xla)] = clf.model
        return clf.model, time.perf_counter() - started

    def device_batch(self, batch: int) -> Any:
        """Random pixels and labels, made on each replica's device (the default strategy has
        one replica, on the default device: the GPU when there is one)."""
        tf, strategy = self.tf, self.placement.strategy
        devices = strategy.extended.worker_devices if self.placement.name != "default" else None

        def make(ctx: Any) -> tuple[Any, Any]:
            replica = ctx.replica_id_in_sync_group
            with tf.device(devices[replica]) if devices else contextlib.nullcontext():
                seed = tf.constant([0, replica], tf.int32)
                images = tf.random.stateless_uniform([batch, self.size, self.size, 3], seed, 0.0, 255.0)
                return images, tf.math.floormod(tf.range(batch, dtype=tf.int64), self.classes)

        return strategy.experimental_distribute_values_from_function(make)

    def steps(self, keras_model: Any, iterator: Any, steps: int, timed: bool = True) -> tuple[float, float]:
        """Seconds of ``steps`` training steps, up to reading the last loss, and that loss
        (the mean over these steps: the metrics are reset first)."""
        fn = keras_model.make_train_function()
        keras_model.reset_metrics()
        traces = keras_model.train_tf_function.experimental_get_tracing_count()
        with keras_model.distribute_strategy.scope():  # as fit calls it
            started = time.perf_counter()
            for _ in range(steps):
                logs = fn(iterator)
            loss = float(logs["loss"])
            seconds = time.perf_counter() - started
        if timed and keras_model.train_tf_function.experimental_get_tracing_count() != traces:
            raise RuntimeError("the training function was traced again while timed")
        return seconds, loss

    def out_of_memory(self, e: Exception) -> bool:
        text = str(e)
        return isinstance(e, self.tf.errors.ResourceExhaustedError) or (
            "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        )

    def cell(self, policy: str, xla: bool, batch: int) -> dict[str, Any]:
        """Section 1's measurement of one policy, XLA setting and per-replica batch."""
        from components.train import model

        s, replicas = self.spec, self.placement.replicas
        entry: dict[str, Any] = {
            "policy": policy,
            "xla": xla,
            "batch": batch,
            "global_batch": batch * replicas,
        }
        with model.global_policy(policy):
            keras_model, built = self.models.get((policy, xla)), 0.0
            if keras_model is None:
                keras_model, built = self.build(policy, xla)
            value = self.device_batch(batch)
            images = self.tf.nest.flatten(value)[0]
            devices = [x.device for x in self.placement.strategy.experimental_local_results(images)]
            iterator = OnDevice(value)
            started = time.perf_counter()
            self.steps(keras_model, iterator, s["warmup_steps"], timed=False)
            warmup = time.perf_counter() - started
            seconds, loss = self.steps(keras_model, iterator, s["steps"])
        self.iterators[(policy, xla, batch)] = iterator
        rate = s["steps"] * batch * replicas / seconds
        return {
            **entry,
            "images_per_second": round(rate, 1),
            "step_ms": round(1000 * seconds / s["steps"], 2),
            "loss": round(loss, 4),
            "loss_finite": math.isfinite(loss),
            "input_devices": devices,
            "build_seconds": round(built, 1),
            "warmup_seconds": round(warmup, 1),
        }

    def run(self) -> dict[str, Any]:
        s = self.spec
        stage_cell = (self.chosen.policy, self.xla)
        configs = [stage_cell] + [
            (p, x) for x in (self.xla, not self.xla) for p in POLICIES if (p, x) != stage_cell
        ]
        out: dict[str, Any] = {
            "strategy": self.placement.name,
            "replicas": self.placement.replicas,
            "device": self.placement.device,
            "stage_choice": {"policy": self.chosen.policy, "reason": self.chosen.reason, "xla": self.xla},
            "cells": [],
            "real_input": {"skipped": "not reached"},
        }
        too_big: set[tuple[str, bool]] = set()
        for batch in s["batches"]:
            for policy, xla in configs:
                entry = {"policy": policy, "xla": xla, "batch": batch}
                if (policy, xla) in too_big:
                    out["cells"].append({**entry, "skipped": "a smaller batch ran out of memory"})
                    continue
                required = batch == s["batches"][0] and xla == self.xla  # what the targets need
                if not required and time.time() > s["deadline"]:
                    out["cells"].append({**entry, "skipped": "time budget (--budget) spent"})
                    continue
                say(f"{s['label']}: {policy}, XLA {'on' if xla else 'off'}, batch {batch}")
                first_of_stage = (policy, xla) == stage_cell and batch == s["batches"][0]
                try:
                    measured = self.cell(policy, xla, batch)
                except Exception as e:  # noqa: BLE001 - recorded, and the other cells still run
                    oom = self.out_of_memory(e)
                    too_big |= {(policy, xla)} if oom else set()
                    out["cells"].append({**entry, "oom": oom, "error": error_line(e)})
                    say(f"{s['label']}: {'out of memory' if oom else 'failed'}: {error_line(e)}; going on")
                    if first_of_stage:
                        out["real_input"] = {"skipped": "the stage's cell failed"}
                    continue
                out["cells"].append(measured)
                say(f"{s['label']}: {measured['images_per_second']} images/s, loss {measured['loss']}")
                if first_of_stage:
                    try:
                        out["real_input"] = self.real_input(batch)
                    except Exception as e:  # noqa: BLE001 - recorded; section 1 goes on
                        out["real_input"] = {"error": error_line(e)}
                        say(f"{s['label']}: real input failed: {error_line(e)}; going on")
        return out

    # ------------------------------------------------------------------------ section 2

    def input_fn(self, inputs: Any, global_batch: int, cache: str, augment: bool = True) -> Any:
        """The candidate phase's ``train_fn`` (``data.training_input``)."""
        from components.train import data

        return data.training_input(
            inputs.train_files, inputs.image_size, global_batch, self.cfg.train, cache, augment
        )

    def input_alone(self, inputs: Any, batch: int, cache: str, augment: bool, skip: int) -> float:
        """Images/s of one input pipeline iterated with no model, as the stage builds it."""
        import tensorflow as tf

        replicas = self.placement.replicas
        dataset = self.input_fn(inputs, batch * replicas, cache, augment)(
            tf.distribute.InputContext(1, 0, replicas)
        )
        iterator = iter(dataset)
        for _ in range(skip):
            next(iterator)
        n = self.spec["real_steps"] * replicas  # as many per-replica batches as the timed steps
        started = time.perf_counter()
        for _ in range(n):
            images, _ = next(iterator)
        float(images[0, 0, 0, 0])
        return n * batch / (time.perf_counter() - started)

    def real_input(self, batch: int) -> dict[str, Any]:
        """Section 2 on the stage's cell's model (built, traced and timed in section 1)."""
        from components.train import data, model, stage

        s, strategy, replicas = self.spec, self.placement.strategy, self.placement.replicas
        inputs = self.inputs
        stage_cache, _ = stage.image_cache(self.cfg, inputs, 1)
        global_batch = batch * replicas
        skip = max(1, inputs.num_train // global_batch) + s["warmup_steps"]  # an epoch: the cache fills
        keras_model = self.models[(self.chosen.policy, self.xla)]
        result: dict[str, Any] = {
            "policy": self.chosen.policy,
            "xla": self.xla,
            "batch": batch,
            "global_batch": global_batch,
            "train_images": inputs.num_train,
            "augment": dataclasses.asdict(self.cfg.train.augment),
            "stage_cache": stage_cache,
            "untimed_steps": skip,
            "runs": {},
        }
        iterators = {}
        with model.global_policy(self.chosen.policy):
            for cache in (data.DECODED, data.NO_CACHE):
                say(f"{s['label']}: real input, cache {cache}")
                dataset = strategy.distribute_datasets_from_function(
                    self.input_fn(inputs, global_batch, cache)
                )
                iterators[cache] = iter(dataset)
                self.steps(keras_model, iterators[cache], skip, timed=False)
                seconds, loss = self.steps(keras_model, iterators[cache], s["real_steps"])
                result["runs"][cache] = {
                    "images_per_second": round(s["real_steps"] * global_batch / seconds, 1),
                    "loss": round(loss, 4),
                    "loss_finite": math.isfinite(loss),
                }
                if cache != stage_cache:
                    del iterators[cache]  # only the stage's is profiled
            seconds, _ = self.steps(
                keras_model, self.iterators[(self.chosen.policy, self.xla, batch)], s["steps"]
            )
            synthetic = s["steps"] * global_batch / seconds
            result["synthetic_images_per_second"] = round(synthetic, 1)
            for run in result["runs"].values():
                run["ratio_to_synthetic"] = round(run["images_per_second"] / synthetic, 3)
            say(f"{s['label']}: the input pipeline alone")
            alone = {
                "decoded": self.input_alone(inputs, batch, data.DECODED, True, skip * replicas),
                "decoded_no_augment": self.input_alone(inputs, batch, data.DECODED, False, skip * replicas),
                "none": self.input_alone(inputs, batch, data.NO_CACHE, True, skip * replicas),
            }
            result["input_alone_images_per_second"] = {k: round(v, 1) for k, v in alone.items()}
            for cache, run in result["runs"].items():
                run["limiter"] = limiter(cache, run["images_per_second"], synthetic, alone)
            result["profile"] = self.profile(keras_model, iterators[stage_cache])
        return result

    def profile(self, keras_model: Any, iterator: Any) -> dict[str, Any]:
        """A few real-input steps under the profiler; the trace and its summary in the work folder."""
        tf, logdir = self.tf, self.spec["profile_dir"]
        try:
            tf.profiler.experimental.start(logdir)
            try:
                self.steps(keras_model, iterator, self.spec["profile_steps"], timed=False)
            finally:
                tf.profiler.experimental.stop()
            summary = summarize_trace(logdir)
        except Exception as e:  # noqa: BLE001 - a profiler that cannot run costs the summary only
            return {"logdir": logdir, "error": error_line(e)}
        with open(os.path.join(logdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return {"logdir": logdir, "steps": self.spec["profile_steps"], **summary}


def error_line(e: Exception) -> str:
    """An exception in one line (TensorFlow's messages run to pages)."""
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:300]}"


def limiter(cache: str, real: float, synthetic: float, alone: dict[str, float]) -> str | None:
    """Which step limits a real-input rate under 0.9x synthetic (None: it does not fall short),
    from the input pipeline's rates alone (images/s: ``decoded`` cache with augmentation,
    ``decoded_no_augment``, ``none``: no cache, with augmentation)."""
    if real >= INPUT_TARGET * synthetic:
        return None
    need = INPUT_TARGET * synthetic
    full = alone["decoded" if cache == "decoded" else "none"]
    if full >= need:
        return (
            f"not the input pipeline (alone {full:.0f} images/s, the device trains {synthetic:.0f}): "
            "the copy to the device or the overlap of input and step; see the profile"
        )
    if cache != "decoded" and alone["decoded"] >= need:
        return f"JPEG decoding every epoch ({full:.0f} images/s alone; {alone['decoded']:.0f} with the cache)"
    if alone["decoded_no_augment"] >= need:
        return (
            f"augmentation on the host ({alone['decoded']:.0f} images/s with it, "
            f"{alone['decoded_no_augment']:.0f} without; the device trains {synthetic:.0f})"
        )
    return (
        f"reading and batching on the host (even cached and unaugmented {alone['decoded_no_augment']:.0f} "
        f"images/s; the device trains {synthetic:.0f})"
    )


def summarize_trace(logdir: str, top: int = 8) -> dict[str, Any]:
    """Per plane of the trace (device streams, host threads): events and the names with the
    most time (inclusive: host events nest, so a plane's times overlap)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not files:
        raise RuntimeError(f"no trace written under {logdir}")
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    planes = []
    get_next: collections.Counter[str] = collections.Counter()  # the step waiting for its batch
    stages: collections.Counter[str] = collections.Counter()  # tf.data's, inclusive
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        totals: collections.Counter[str] = collections.Counter()
        events = 0
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                totals[name[:100]] += event.duration_ps
                events += 1
                if name.startswith("Iterator::"):
                    stages[name.removeprefix("Iterator::Root::")[-100:]] += event.duration_ps
                elif "GetNext" in name:
                    get_next[name[:100]] += event.duration_ps
        if events:
            top_ms = [[name, round(ps / 1e9, 3)] for name, ps in totals.most_common(top)]
            planes.append({"plane": plane.name, "events": events, "top_ms": top_ms})
    return {
        "trace": os.path.relpath(files[-1], logdir),
        "get_next_ms": {name: round(ps / 1e9, 3) for name, ps in get_next.most_common(top)},
        "input_stages_ms": [[name, round(ps / 1e9, 3)] for name, ps in stages.most_common(top)],
        "planes": planes,
    }


def child_main(spec: dict[str, Any]) -> None:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # inherited from the parent; also when run by hand
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = Child(spec).run()
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent


def run_child(spec: dict[str, Any], timeout: float, work: str) -> dict[str, Any]:
    """A child process for one backbone: its ``[bench]`` lines relayed as they come, the rest
    of its stderr kept for an error; returns its result (or the error, and the run goes on)."""
    command = [sys.executable, "-m", "benchmarks.bench_gpu", "--child", json.dumps(spec)]
    out_path = os.path.join(work, f"child-{spec['name']}.out")
    with open(out_path, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        tail: collections.deque[str] = collections.deque(maxlen=40)
        try:
            for line in proc.stderr:
                if line.startswith("[bench"):
                    print(line, end="", file=sys.stderr, flush=True)
                else:
                    tail.append(line)
            proc.wait()
        finally:
            timer.cancel()
    lines = open(out_path).read().strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    why = "timed out" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    say(f"{spec['label']}: the child failed ({why}); going on")
    return {"error": f"{why}: " + "".join(tail)[-3000:]}


def stage_result(run_dir: str, seconds: dict[str, float]) -> dict[str, Any]:
    """Section 3 from the stage's own files."""
    train = os.path.join(run_dir, "train")
    summary = json.load(open(os.path.join(train, "summary.json")))
    verdict = json.load(open(os.path.join(run_dir, "evaluate", "verdict.json")))
    losses = {}
    for phase in ("baseline", "candidate"):
        history = json.load(open(os.path.join(train, phase, "history.json")))
        losses |= {f"{phase} {k}": v for k, v in history.items() if k.endswith("loss")}
        if summary[phase].get("eval"):
            losses[f"{phase} exact eval loss"] = [summary[phase]["eval"]["loss"]]
    candidate = summary["candidate"]
    epochs = max(1, candidate["epochs_run"])
    images_per_epoch = candidate["steps_per_epoch"] * summary["global_batch_size"]
    return {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        **{k: summary[k] for k in ("precision_policy", "precision_reason", "xla", "strategy", "device")},
        **{k: summary[k] for k in ("replicas", "workers", "global_batch_size", "image_cache", "backbone")},
        "finetune_epochs_run": candidate["epochs_run"],
        "seconds_per_finetune_epoch": round(candidate["seconds"] / epochs, 2),
        "train_seconds_per_finetune_epoch": round(images_per_epoch / candidate["images_per_second"], 2),
        "finetune_images_per_second": candidate["images_per_second"],
        "final_losses": {k: v[-1] for k, v in losses.items()},
        "losses_finite": all(math.isfinite(x) for v in losses.values() for x in v),
        "verdict": {
            k: verdict[k]
            for k in ("blessed", "reason", "metric", "baseline", "candidate", "delta", "test_examples")
        },
    }


def find_cell(entry: dict | None, policy: str, xla: bool, batch: int | None = None) -> dict | None:
    """The measured cells of ``entry`` with this policy and XLA (and batch); the fastest."""
    cells = [
        c
        for c in (entry or {}).get("cells", [])
        if c["policy"] == policy and c["xla"] == xla and "images_per_second" in c
        and (batch is None or c["batch"] == batch)
    ]  # fmt: skip
    return max(cells, key=lambda c: c["images_per_second"], default=None)


def targets(result: dict[str, Any], gpu_names: list[str]) -> list[dict[str, Any]]:
    """The issue's targets beside what was reached; ``met`` null where not judged."""
    judged = not result["smoke"] and result["environment"]["device"] == "gpu"
    by_backbone: dict[str, dict] = {}  # the first entry of each backbone, whatever its alpha
    for entry in result["synthetic"]:
        by_backbone.setdefault(
            entry["backbone"], {**entry, "real_input": result["real_input"][entry["label"]]}
        )
    out = []

    def add(name: str, target: str, reached: float | None, ok: bool | None, note: str = "") -> None:
        out.append({"name": name, "target": target, "reached": reached, "met": ok if judged else None})
        if note:
            out[-1]["note"] = note

    resnet = by_backbone.get("resnet50")
    xla = (resnet or {}).get("stage_choice", {}).get("xla", True)
    cell = find_cell(resnet, "mixed_float16", True)
    reached = round(cell["images_per_second"] / resnet["replicas"], 1) if cell else None
    h100 = bool(gpu_names) and all("H100" in n for n in gpu_names)
    add(
        "resnet50 mixed_float16 + XLA, synthetic input, images/s per GPU (best batch)",
        f">= {RESNET_TARGET:.0f} on one H100",
        reached,
        None if reached is None or not h100 else reached >= RESNET_TARGET,
        "" if h100 or not judged else f"not judged: the target is an H100's, this is {gpu_names}",
    )
    for backbone in ("resnet50", "mobilenet_v2"):
        real = (by_backbone.get(backbone) or {}).get("real_input", {})
        run = real.get("runs", {}).get(real.get("stage_cache"), {})
        ratio = run.get("ratio_to_synthetic")
        add(
            f"{backbone} real input / synthetic (cache as the stage chooses)",
            f">= {INPUT_TARGET}",
            ratio,
            None if ratio is None else ratio >= INPUT_TARGET,
        )
    f32, mixed = (find_cell(resnet, p, xla, (result["settings"]["batches"] or [0])[0]) for p in POLICIES)
    ratio = round(mixed["images_per_second"] / f32["images_per_second"], 3) if f32 and mixed else None
    add(
        f"resnet50 mixed_float16 / float32, synthetic (XLA {'on' if xla else 'off'}, first batch)",
        f">= {MIXED_TARGET}",
        ratio,
        None if ratio is None else ratio >= MIXED_TARGET,
    )
    return out


def table(result: dict[str, Any]) -> list[str]:
    """The readable summary printed on stderr."""
    lines = ["synthetic input: images/s (global), data made on the device"]
    lines.append(f"{'backbone':<26}{'policy':<15}{'XLA':<5}{'batch':>6}{'images/s':>11}{'step ms':>9}  loss")
    for entry in result["synthetic"]:
        if "error" in entry:
            lines.append(f"{entry['label']:<26}child failed: {entry['error'][:70]}")
        for c in entry.get("cells", []):
            head = f"{entry['label']:<26}{c['policy']:<15}{'on' if c['xla'] else 'off':<5}{c['batch']:>6}"
            if "images_per_second" in c:
                lines.append(f"{head}{c['images_per_second']:>11.1f}{c['step_ms']:>9.1f}  {c['loss']:.4f}")
            else:
                lines.append(f"{head}  {'out of memory' if c.get('oom') else c.get('skipped', '')}")
    lines.append("real input: data.image_dataset from the TFRecords, augmented; the stage's policy and XLA")
    lines.append(f"{'backbone':<26}{'cache':<9}{'images/s':>10}{'synthetic':>11}{'ratio':>7}  limiter")
    for entry in result["synthetic"]:
        real = result["real_input"][entry["label"]]
        for cache, run in real.get("runs", {}).items():
            lines.append(
                f"{entry['label']:<26}{cache:<9}{run['images_per_second']:>10.1f}"
                f"{real['synthetic_images_per_second']:>11.1f}{run['ratio_to_synthetic']:>7.2f}  "
                + (run["limiter"] or "-")
            )
        if "skipped" in real:
            lines.append(f"{entry['label']:<26}{real['skipped']}")
        if real.get("input_alone_images_per_second"):
            alone = ", ".join(f"{k} {v:.1f}" for k, v in real["input_alone_images_per_second"].items())
            lines.append(f"{'':<26}input alone, images/s: {alone}")
    st = result["stage"]
    if "error" in st:
        lines.append(f"stage: {st['error'].splitlines()[0]} (see the work folder's logs)")
        return lines + target_lines(result)
    v = st["verdict"]
    lines.append(
        f"stage: {st['backbone']}, {st['precision_policy']} ({st['precision_reason']}), XLA {st['xla']}, "
        f"{st['strategy']} strategy, {st['replicas']} replica(s) on {st['device']}"
    )
    epoch, training = st["seconds_per_finetune_epoch"], st["train_seconds_per_finetune_epoch"]
    lines.append(
        f"  {epoch} s per fine-tuning epoch ({training} s training), losses finite: {st['losses_finite']}; "
        f"gate: {'BLESSED' if v['blessed'] else 'NOT BLESSED'} "
        f"({v['metric']} baseline {v['baseline']:.4f}, candidate {v['candidate']:.4f})"
    )
    return lines + target_lines(result)


def target_lines(result: dict[str, Any]) -> list[str]:
    lines = ["targets"]
    for t in result["targets"]:
        met = {True: "met", False: "NOT met", None: "not judged"}[t["met"]]
        lines.append(f"  {t['name']}: {t['target']}; reached {t['reached']}; {met}")
    return lines


def failures(result: dict[str, Any]) -> list[str]:
    """What failed (an out-of-memory is a result, not a failure)."""
    out = [f"{e['label']}: {e['error'][:200]}" for e in result["synthetic"] if "error" in e]
    for e in result["synthetic"]:
        out += [f"{e['label']} {c['policy']} XLA {c['xla']} batch {c['batch']}: {c['error']}"
                for c in e.get("cells", []) if "error" in c and not c.get("oom")]  # fmt: skip
    out += [f"{k} real input: {v['error']}" for k, v in result["real_input"].items() if "error" in v]
    if "error" in result["stage"]:
        out.append(result["stage"]["error"].splitlines()[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the harness, end to end")
    parser.add_argument(
        "--beans", default="../shared/datasets/beans", help="the beans photos (split folders)"
    )
    parser.add_argument(
        "--weights",
        default="../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        help="MobileNetV2 ImageNet weights (no top, .h5) for the stage (section 3)",
    )
    parser.add_argument("--backbones", help=f"NAME[:ALPHA],... (default {FULL['backbones']})")
    parser.add_argument("--batches", help=f"per-replica batches, ascending (default {FULL['batches']})")
    parser.add_argument("--steps", type=int, help=f"timed synthetic steps (default {FULL['steps']})")
    parser.add_argument(
        "--warmup-steps", type=int, help=f"untimed steps first (default {FULL['warmup_steps']})"
    )
    parser.add_argument(
        "--real-steps", type=int, help=f"timed real-input steps (default {FULL['real_steps']})"
    )
    parser.add_argument(
        "--budget", type=float, help=f"seconds for sections 1-2 (default {FULL['budget']:.0f})"
    )
    parser.add_argument("--out", default="runs/bench/gpu.json", help="where the JSON result goes")
    add_work_options(parser, "the work folder (TFRecords, stage outputs, logs, profiles)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine (children inherit it)
    from pipeline import quiet
    from pipeline.cli import tensorflow_options

    tensorflow_options("train")  # the training stage's TensorFlow options, for every child too
    quiet.import_tensorflow_quietly()  # CUDA's and TensorFlow's start-up lines held back
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.smoke:
        print(NO_GPU, file=sys.stderr)
        sys.exit(2)
    defaults = SMOKE if args.smoke else FULL
    settings = {
        "backbones": parse_backbones(args.backbones or defaults["backbones"]),
        "image_size": defaults["image_size"],
        "batches": [int(b) for b in (args.batches or defaults["batches"]).split(",")],
        **{
            k: defaults[k] if getattr(args, k) is None else getattr(args, k)
            for k in ("steps", "warmup_steps", "real_steps", "budget")
        },
        "profile_steps": defaults["profile_steps"],
    }
    gpu_names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    with work_folder(args, "bench-gpu-") as work:
        result = run(args, settings, work, gpu_names, tf.__version__)
    for line in table(result):
        say(line)
    write_result(args.out, result)
    failed = failures(result)
    if failed:  # the result is written; the exit code says that part of it is missing
        say(f"{len(failed)} part(s) failed: " + "; ".join(failed))
        sys.exit(1)


def run(args: argparse.Namespace, s: dict[str, Any], work: str, gpu_names: list[str], version: str) -> dict:
    started = time.perf_counter()
    run_dir = os.path.join(work, "stage")
    if args.smoke:
        from tests.train_helpers import make_colour_images

        source = os.path.join(work, "images")
        say(f"smoke: {make_colour_images(source, per_class=16, size=48)} generated images in {source}")
        stage_sets = [
            "model.alpha=0.35", "model.weights=none", f"model.image_size={s['image_size']}",
            f"train.batch_size={s['batches'][0]}", "train.baseline_epochs=1", "train.finetune_epochs=1",
        ]  # fmt: skip
    else:
        source = os.path.abspath(args.beans)
        alpha, weights = mobilenet_v2_alpha(args.weights), os.path.abspath(args.weights)
        stage_sets = [
            f"model.alpha={alpha}",
            f"model.weights={weights}",
            f"model.image_size={s['image_size']}",
        ]
    base = [f"data.source={source}", f"run_dir={run_dir}"]
    options = ["--config", BEANS_CONFIG]
    for setting in [*base, "model.backbone=mobilenet_v2", *stage_sets]:
        options += ["--set", setting]
    try:
        seconds = {"preprocess": finetune("preprocess", options, work)}
    except StageFailed as e:  # nothing measured yet, and sections 2 and 3 need the TFRecords
        raise SystemExit(str(e)) from None

    synthetic, real_input = [], {}
    deadline = time.time() + s["budget"]
    for i, b in enumerate(s["backbones"]):
        name = label(b["backbone"], b["alpha"])
        share = (deadline - time.time()) / (len(s["backbones"]) - i)
        overrides = [
            *base, f"model.backbone={b['backbone']}", f"model.image_size={s['image_size']}",
            "model.weights=none", f"train.batch_size={s['batches'][0]}",
            f"model.alpha={b['alpha'] or 1.0}",  # beans.yaml's 0.35 is its MobileNet's; ResNet has none
        ]  # fmt: skip
        spec = {
            **{k: s[k] for k in ("batches", "steps", "warmup_steps", "real_steps", "profile_steps")},
            "name": re.sub(r"[^a-z0-9.]+", "-", name),
            "label": name,
            "overrides": overrides,
            "deadline": time.time() + share,
            "profile_dir": os.path.join(work, "profile", re.sub(r"[^a-z0-9.]+", "-", name)),
        }
        say(f"{name}: synthetic and real input ({max(share, 0):.0f} s of the budget left)")
        t0 = time.perf_counter()
        entry = run_child(spec, max(share, 0) + 600, work)
        real_input[name] = entry.pop("real_input", {"skipped": "the child failed"})
        synthetic.append({"backbone": b["backbone"], "alpha": b["alpha"], "label": name, **entry})
        seconds[f"child {name}"] = time.perf_counter() - t0

    try:
        seconds["train"] = finetune("train", options, work)
        seconds["evaluate"] = finetune("evaluate", options, work)
        stage = stage_result(run_dir, seconds)
    except StageFailed as e:  # sections 1 and 2 are kept
        say(str(e).splitlines()[0])
        stage = {"error": str(e), "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    device = "gpu" if gpu_names else "cpu"
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "smoke": args.smoke,
        "environment": {
            "tensorflow": version,
            "device": device,
            "gpus": gpu_names,
            "cpu_cores": os.cpu_count(),
        },
        "settings": {**s, "backbones": [label(b["backbone"], b["alpha"]) for b in s["backbones"]]},
        "synthetic": synthetic,
        "real_input": real_input,
        "stage": stage,
        "distribution": {
            "visible_gpus": len(gpu_names),
            "stage": {
                k: stage.get(k) for k in ("strategy", "replicas", "device", "workers", "global_batch_size")
            },
            "synthetic": {
                e["label"]: {k: e.get(k) for k in ("strategy", "replicas", "device")} for e in synthetic
            },
            "every_gpu_used": all(
                x["replicas"] == max(1, len(gpu_names)) for x in [stage, *synthetic] if "error" not in x
            ),
        },
    }
    result["targets"] = targets(result, gpu_names)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


if __name__ == "__main__":
    main()
