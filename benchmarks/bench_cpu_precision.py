"""float32 against mixed bfloat16 on this CPU, for every backbone of the table.

``train.mixed_precision: auto`` trains a backbone in bfloat16 on a CPU with AMX or AVX-512
BF16 only where its entry says bfloat16 pays there (``Backbone.cpu_bfloat16``); this
benchmark is what that column rests on. Each backbone runs in a child process of its own,
which builds the classifier twice through the project's own code (``model.build_classifier``
with random weights, ``model.unfreeze_top`` at the backbone's default layer,
``model.compile_model``), once under each policy, and then, in ``--rounds`` rounds whose
order alternates, times on one fixed batch of random pixels (``--batch``):

* ``train``: candidate-phase training steps (``train_on_batch``), the fine-tuning that
  dominates a CPU run;
* ``forward``: the baseline phase's frozen feature extraction (``model.feature_extractor``).

Reported per backbone: images/s of each under each policy (medians), and the bfloat16 over
float32 ratio of each round and its median (only same-round ratios are compared: a shared
machine's speed drifts over minutes). Plus the CPU's model name and whether it has AMX and
AVX-512 BF16 (``precision.cpu_features``), and whether the table's ``cpu_bfloat16`` agrees
with the measurement (``pays``: train ratio >= ``--pays`` and forward ratio >= 1).

Sizes: each backbone at its default input size (224 px), unless ``--size NAME=PX,...`` says
otherwise (for a machine where a step takes too long); the result states the size used.

The result goes to ``--out`` as JSON (default ``runs/bench/cpu_precision.json``) and to
stdout, with a table on stderr.

``--accuracy`` measures instead whether bfloat16 costs accuracy, with the public commands:
``finetune preprocess`` of ``--beans`` at 224 px once, then ``finetune train`` and ``finetune
evaluate`` on those same TFRecords twice, ``train.mixed_precision`` false and true, with
``configs/beans.yaml`` and the backbone the offline ``--weights`` are for (MobileNetV2, alpha
from the file name). Reported per policy: the policy the stage chose, seconds per fine-tuning
epoch, the final losses, the baseline's and the candidate's test accuracy and the gate's
verdict; and the candidate's difference against the test set's noise (two binomial standard
errors). Result: ``runs/bench/cpu_precision_accuracy.json``.

Usage, from the repository root: python -m benchmarks.bench_cpu_precision
    python -m benchmarks.bench_cpu_precision --accuracy --beans ../shared/datasets/beans \
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks.common import (
    ROOT,
    StageFailed,
    add_work_options,
    finetune,
    mobilenet_v2_alpha,
    paired,
    say,
    work_folder,
    write_result,
)

POLICIES = ("float32", "mixed_bfloat16")


def child(args: argparse.Namespace) -> None:
    """Both policies of one backbone in this process; prints one JSON line."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import numpy as np
    import tf_keras

    from components.train import model

    name, size, batch = args.child, args.child_size, args.batch
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    labels = np.arange(batch) % 3
    built = {}
    for policy in POLICIES:
        tf_keras.mixed_precision.set_global_policy(policy)
        started = time.perf_counter()
        clf = model.build_classifier(name, size, 3, weights="none")
        model.unfreeze_top(clf, name, "")
        model.compile_model(clf.model, 1e-4, False)
        extract = model.feature_extractor(clf)
        for _ in range(args.skip_steps):  # traces, then settles
            clf.model.train_on_batch(images, labels)
            extract(images)
        built[policy] = (clf.model, extract, round(time.perf_counter() - started, 1))
    tf_keras.mixed_precision.set_global_policy("float32")

    rounds = []
    for i in range(args.rounds):
        order = POLICIES if i % 2 == 0 else POLICIES[::-1]
        measured: dict[str, dict[str, float]] = {}
        for policy in order:
            keras_model, extract, _ = built[policy]
            started = time.perf_counter()
            for _ in range(args.steps):
                loss = keras_model.train_on_batch(images, labels)[0]  # [loss, accuracy]
            train = args.steps * batch / (time.perf_counter() - started)
            if not np.isfinite(loss):
                raise SystemExit(f"{name} {policy}: loss {loss} is not finite")
            started = time.perf_counter()
            for _ in range(args.steps):
                extract(images)
            forward = args.steps * batch / (time.perf_counter() - started)
            measured[policy] = {"train": round(train, 2), "forward": round(forward, 2)}
        rounds.append(measured)
    warmup = {policy: built[policy][2] for policy in POLICIES}
    print(json.dumps({"rounds": rounds, "build_and_warmup_seconds": warmup}), flush=True)


def run_child(args: argparse.Namespace, name: str, size: int) -> dict:
    command = [
        sys.executable, "-m", "benchmarks.bench_cpu_precision", "--child", name, "--child-size", str(size),
        "--batch", str(args.batch), "--steps", str(args.steps), "--skip-steps", str(args.skip_steps),
        "--rounds", str(args.rounds),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name}: the child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(name: str, size: int, measured: dict, pays: float, table_says: bool) -> dict:
    rounds = measured["rounds"]
    entry: dict = {"backbone": name, "image_size": size, "rounds": rounds}
    keys = ("bfloat16_images_per_second", "float32_images_per_second", "bfloat16_over_float32")
    for what in ("train", "forward"):
        entry[what] = paired(rounds, what, "mixed_bfloat16", "float32", keys)
    entry["pays"] = (
        entry["train"]["bfloat16_over_float32"] >= pays and entry["forward"]["bfloat16_over_float32"] >= 1.0
    )
    entry["table_cpu_bfloat16"] = table_says
    entry["build_and_warmup_seconds"] = measured["build_and_warmup_seconds"]
    return entry


def accuracy(args: argparse.Namespace, work: str) -> dict:
    """float32 against bfloat16 training on the same beans TFRecords, through the CLI."""
    import shutil

    alpha = mobilenet_v2_alpha(args.weights)
    common = [
        "--config", os.path.join(ROOT, "configs", "beans.yaml"),
        "--set", f"data.source={os.path.abspath(args.beans)}",
        "--set", "model.backbone=mobilenet_v2", "--set", f"model.alpha={alpha}",
        "--set", f"model.weights={os.path.abspath(args.weights)}",
    ]  # fmt: skip

    def call(command: str, options: list[str], run_dir: str) -> None:
        try:
            finetune(command, options, os.path.join(run_dir, "logs"))
        except StageFailed as e:
            raise SystemExit(str(e)) from None

    first = os.path.join(work, "float32")
    call("preprocess", [*common, "--set", f"run_dir={first}"], first)
    runs = {}
    for setting, name in (("false", "float32"), ("true", "bfloat16")):
        run_dir = os.path.join(work, name)
        if run_dir != first:
            shutil.copytree(os.path.join(first, "preprocess"), os.path.join(run_dir, "preprocess"))
        options = [*common, "--set", f"run_dir={run_dir}", "--set", f"train.mixed_precision={setting}"]
        call("train", options, run_dir)
        call("evaluate", options, run_dir)
        train = json.load(open(os.path.join(run_dir, "train", "summary.json")))
        verdict = json.load(open(os.path.join(run_dir, "evaluate", "verdict.json")))
        candidate = train["candidate"]
        runs[name] = {
            "precision_policy": train["precision_policy"],
            "precision_reason": train["precision_reason"],
            "finetune_epochs": candidate["epochs"],
            "seconds_per_finetune_epoch": round(candidate["seconds"] / max(1, candidate["epochs"]), 1),
            "baseline_eval_loss": train["baseline"]["eval"]["loss"],
            "candidate_eval_loss": candidate["eval"]["loss"],
            "test_examples": verdict["test_examples"],
            "baseline_test_accuracy": verdict["baseline"],
            "candidate_test_accuracy": verdict["candidate"],
            "blessed": verdict["blessed"],
        }
        say(f"{name}: {json.dumps(runs[name])}")
    f32, bf16 = runs["float32"], runs["bfloat16"]
    n = f32["test_examples"]
    p = f32["candidate_test_accuracy"]
    noise = 2 * (p * (1 - p) / n) ** 0.5
    difference = bf16["candidate_test_accuracy"] - p
    return {
        "benchmark": "cpu_precision_accuracy",
        "backbone": f"mobilenet_v2 alpha {alpha}, ImageNet weights, 224 px, configs/beans.yaml",
        "runs": runs,
        "candidate_accuracy_difference": round(difference, 4),
        "test_noise_two_standard_errors": round(noise, 4),
        "within_noise": abs(difference) <= noise,
        "same_verdict": f32["blessed"] == bf16["blessed"],
    }


HEADER = "backbone          size  train f32   bf16  ratio  forward f32   bf16  ratio  pays   table"


def row(e: dict) -> str:
    """One line of the table (images/s, medians; ratios bfloat16 / float32)."""
    tr, fw = e["train"], e["forward"]
    return (
        f"{e['backbone']:<17}{e['image_size']:>5}  {tr['float32_images_per_second']:>9.1f} "
        f"{tr['bfloat16_images_per_second']:>6.1f} {tr['bfloat16_over_float32']:>5.2f}x  "
        f"{fw['float32_images_per_second']:>11.1f} {fw['bfloat16_images_per_second']:>6.1f} "
        f"{fw['bfloat16_over_float32']:>5.2f}x  {str(e['pays']):<6} {e['table_cpu_bfloat16']}"
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, px = part.partition("=")
        if not px.isdigit():
            raise SystemExit(f"--size {text}: expected NAME=PX,...")
        sizes[name.strip()] = int(px)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", default="", help="comma-separated names (default: every backbone)")
    parser.add_argument("--size", default="", help="NAME=PX,... overrides of the default size")
    parser.add_argument("--batch", type=int, default=32, help="images per step (train.batch_size's default)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each measurement")
    parser.add_argument("--skip-steps", type=int, default=2, help="untimed first steps (tracing)")
    parser.add_argument("--pays", type=float, default=1.2, help="the train ratio at which bfloat16 pays")
    parser.add_argument("--out", default="runs/bench/cpu_precision.json", help="where the JSON result goes")
    parser.add_argument(
        "--accuracy", action="store_true", help="train and evaluate beans under both policies"
    )
    parser.add_argument("--beans", default="../shared/datasets/beans", help="--accuracy: the beans photos")
    parser.add_argument("--weights", help="--accuracy: MobileNetV2 ImageNet weights (no top), .h5")
    add_work_options(parser, "--accuracy's run directories")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.accuracy:
        if not args.weights:
            parser.error("--accuracy needs --weights")
        if args.out == parser.get_default("out"):
            args.out = "runs/bench/cpu_precision_accuracy.json"
        with work_folder(args, "bench-precision-") as work:
            write_result(args.out, accuracy(args, work))
        return
    from components.backbones import BACKBONES, get_backbone
    from components.train.precision import cpu_features

    names = [n.strip() for n in args.backbones.split(",") if n.strip()] or list(BACKBONES)
    for n in names:
        get_backbone(n)  # an unknown name fails here, with the valid ones
    sizes = parse_sizes(args.size)
    features = cpu_features()
    started = time.perf_counter()
    say(f"CPU {cpu_model()}: {features.describe()}; {os.cpu_count()} cores; {len(names)} backbones")
    entries = []
    for n in names:
        size = sizes.get(n, BACKBONES[n].default_size)
        t0 = time.perf_counter()
        entry = summarize(n, size, run_child(args, n, size), args.pays, BACKBONES[n].cpu_bfloat16)
        entries.append(entry)
        say(f"{row(entry)}  ({time.perf_counter() - t0:.0f} s)")
    result = {
        "benchmark": "cpu_precision",
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), **dataclasses.asdict(features)},
        "batch": args.batch,
        "rounds": args.rounds,
        "steps": args.steps,
        "pays_at_train_ratio": args.pays,
        "backbones": entries,
        "table_agrees": all(e["pays"] == e["table_cpu_bfloat16"] for e in entries),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    say(HEADER)
    for entry in entries:
        say(row(entry))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
