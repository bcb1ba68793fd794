"""TensorFlow's oneDNN CPU kernels on against off, for the demo's model.

TensorFlow turns oneDNN on by default only on CPUs with AVX-512 VNNI/BF16 or AMX; the
``pipeline`` package turns it on everywhere else for its training work, because the
candidate phase on an AVX2 CPU is slower without it. This benchmark keeps that choice
honest: each round runs two child processes, one with ``TF_ENABLE_ONEDNN_OPTS=1``
and one with ``=0`` (the variable is read once, when TensorFlow is imported, so one process
cannot measure both), their order alternating from round to round.

Each child builds the configured classifier (``--config``: the demo's MobileNetV2 0.35 at
224 px by default, with the real ImageNet weights ``--weights``), and on one fixed batch of
real beans photos times, after ``--skip-steps`` untimed steps:

* ``train``: candidate-phase steps (``model.unfreeze_top`` as configured, ``compile_model``),
  the fine-tuning that dominates a CPU run;
* ``features``: frozen forward passes (the baseline's feature extraction and evaluation);
* ``single``: forward passes of one image, as a latency figure or a serving request sees
  them (reported as images/s too; oneDNN is known to be weak at batch size 1).

Reported: images/s of each, and the on/off ratio per round and its median (the machine's
speed drifts over minutes, so only same-round ratios are compared).

The result goes to ``--out`` as JSON (default ``runs/bench/cpu_kernels.json``) and to stdout.

Usage, from the repository root: python -m benchmarks.bench_cpu_kernels --beans ../shared/datasets/beans \\
    --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

from benchmarks.common import paired, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"on": "1", "off": "0"}


def child(args: argparse.Namespace) -> None:
    """One measurement in this process, with whatever TF_ENABLE_ONEDNN_OPTS it was given."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import numpy as np
    import tensorflow as tf

    from components.config import load_config
    from components.train import model

    cfg = load_config(args.config, [f"model.weights={args.weights}"])
    m, t = cfg.model, cfg.train
    size, batch = m.image_size, t.batch_size
    paths = sorted(glob.glob(os.path.join(args.beans, "train", "*", "*.jpg")))[:batch]
    if len(paths) < batch:
        raise SystemExit(f"--beans {args.beans}: fewer than {batch} train/<class>/*.jpg photos")
    images = np.stack(
        [
            tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(p), channels=3), [size, size]).numpy()
            for p in paths
        ]
    )
    labels = np.arange(batch) % 3
    clf = model.build_classifier(m.backbone, size, 3, weights=m.weights, alpha=m.alpha, dropout=m.dropout)
    extract = model.feature_extractor(clf)
    for _ in range(args.skip_steps):
        extract(images)
    started = time.perf_counter()
    for _ in range(args.steps):
        extract(images)
    features = args.steps * batch / (time.perf_counter() - started)
    one = images[:1]
    for _ in range(args.skip_steps):
        extract(one)
    started = time.perf_counter()
    for _ in range(args.steps):
        extract(one)
    single = args.steps / (time.perf_counter() - started)

    model.unfreeze_top(clf, m.backbone, t.unfreeze)
    model.compile_model(clf.model, t.finetune_learning_rate or t.baseline_learning_rate / 10, False)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    clf.model.fit(dataset, steps_per_epoch=args.skip_steps, epochs=1, verbose=0)
    started = time.perf_counter()
    clf.model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0)
    train = args.steps * batch / (time.perf_counter() - started)
    print(
        json.dumps({"train": round(train, 2), "features": round(features, 2), "single": round(single, 2)}),
        flush=True,
    )


def measure(args: argparse.Namespace, setting: str) -> dict[str, float]:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": SETTINGS[setting]}
    command = [sys.executable, "-m", "benchmarks.bench_cpu_kernels", "--child", *sys.argv[1:]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {setting} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--beans", required=True, help="the beans photos (split folders)")
    parser.add_argument("--weights", required=True, help="MobileNetV2 ImageNet weights file (no top)")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "beans.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each measurement")
    parser.add_argument("--skip-steps", type=int, default=3, help="untimed first steps")
    parser.add_argument("--out", default="runs/bench/cpu_kernels.json", help="where the JSON result goes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rounds = []
    for i in range(args.rounds):
        order = ["on", "off"] if i % 2 == 0 else ["off", "on"]
        measured = {setting: measure(args, setting) for setting in order}
        rounds.append(measured)
        print(f"[bench] round {i + 1}/{args.rounds}: {json.dumps(measured)}", flush=True)
    result: dict = {"benchmark": "cpu_kernels", "rounds": rounds}
    keys = ("on_images_per_second", "off_images_per_second", "on_over_off")
    for what in ("train", "features", "single"):
        result[what] = paired(rounds, what, "on", "off", keys)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
