"""Batch prediction: ``finetune predict`` against a plain loop over the same SavedModel.

1. Model. MobileNetV2 alpha 0.35 with the ImageNet weights (``--weights``) and a 3-class
   head, exported once by ``components.evaluate.export.staged`` at ``--image-size`` (224
   px) in a child process: raw encoded bytes in, decoding and resizing in the graph.
2. Inputs. Byte-distinct copies of ``--data``'s photos (the 500x500 beans JPEGs, not
   downscaled; a unique trailer after the JPEG end marker, made by ``bench_scale``'s
   ``grow_source``), in class folders; one folder grows from one of ``--sizes`` to the next,
   and a second holds ``--batch-size`` copies (one batch: the start-up runs).
3. Throughput, on the smallest size, ``--rounds`` rounds; each runs every variant back to
   back, each in a child process of its own, the order rotating (the machine's speed drifts
   over minutes: only ratios within a round are compared; medians and the spread of the
   per-round ratios are reported). Before each child the benchmark waits, up to
   ``--quiet-wait`` seconds in all, for other work to leave the machine; each child records
   the share of the machine other work used meanwhile (``others_share``, from
   ``/proc/stat``), and the medians use only the quiet rounds (under 10%) when there are any.

   * ``loop_1`` / ``loop_2``: a plain loop (:func:`loop_child`): list the files, read each
     file's bytes, call the SavedModel's ``serving_default`` on batches of
     ``--batch-size``; TensorFlow's intra- and inter-op threads set to 1 / 2.
   * ``python -m pipeline.cli predict --model M --input F --output O`` (``finetune
     predict``) with ``predict.batch_size=--batch-size`` and: ``per_core`` (model_threads
     1, num_workers 0, image_threads 1); ``threads_2`` (model_threads 2 in the one
     in-process worker, image_threads 1); ``processes_2`` (num_workers 2, the local
     runner's worker processes, model_threads 1, image_threads 1); ``default`` (nothing
     set: model_threads 0 = TensorFlow's default, image_threads 0 = one per core).

   Three measures, the same way for both sides. ``end_to_end``: each side's own seconds
   from after its imports to its end: the pipeline's ``summary.json`` ``seconds``
   (resolving the model, listing, the Beam run with the model's load in the worker,
   publishing), the loop's load + listing + loop (``seconds``). ``wall``: each child's wall
   time, the interpreter's and the imports included (Beam's too). ``steady``: start-up
   excluded: the loop's images after its first batch over the time they took; the
   pipeline's (N - n) / (T_N - T_n) with T_n the ``seconds`` of a one-batch run (n images)
   right after, in the same round (not for ``processes_2``: two worker processes starting
   up are no fixed cost, as ``bench_preprocess`` found). Ratios: ``per_core`` / ``loop_1``
   (target >= 0.8) and the faster 2-core pipeline / ``loop_1`` (>= 1.6); ``loop_2 /
   loop_1`` is what TensorFlow's threads give the loop itself.
4. Memory. Peak RSS (``ru_maxrss`` from ``os.wait4`` on the child: the largest resident
   set of it or of any process it waited for) of the ``default`` pipeline at every size
   (the smallest: the rounds' median); largest / smallest, target <= 1.15 ("flat":
   nothing collects the results). The default's steady rate between the two smallest sizes
   is reported beside.

Targets are reported, never asserted. ``threads_warning`` says whether a pipeline logged
that ``predict.model_threads`` could not take effect. The model, images and logs are deleted
at the end unless ``--keep``. The result goes to ``--out`` as JSON (default
``runs/bench/predict.json``) and to stdout.

Usage, from the repository root:
    python -m benchmarks.bench_predict --data ../shared/datasets/beans_raw_sample \\
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.bench_scale import grow_source, sample_files
from benchmarks.common import add_work_options, work_folder, write_result

STARTED = time.perf_counter()
CORES = os.cpu_count() or 1
CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]
THREADS_WARNING = "TensorFlow already started here"  # components/predict/pipeline.py's warning
LOOPS = {"loop_1": 1, "loop_2": 2}  # name -> TensorFlow threads (intra and inter op)
PIPELINES = {  # name -> the pipeline's --set overrides (beside predict.batch_size)
    "per_core": {"predict.model_threads": 1, "predict.num_workers": 0, "predict.image_threads": 1},
    "threads_2": {"predict.model_threads": 2, "predict.num_workers": 0, "predict.image_threads": 1},
    "processes_2": {"predict.model_threads": 1, "predict.num_workers": 2, "predict.image_threads": 1},
    "default": {},
}
NO_STEADY = ("processes_2",)
TWO_CORE = ("threads_2", "processes_2", "default")
MEASURES = {
    "end_to_end": "images_per_second",
    "wall": "images_per_second_wall",
    "steady": "steady_images_per_second",
}
TARGETS = {"per_core_vs_loop_1": (">=", 0.8), "best_2_core_vs_loop_1": (">=", 1.6)}
MEMORY_TARGET = ("<=", 1.15)
QUIET = 0.1  # a quiet child: other work used under this share of the machine meanwhile


def say(message: str) -> None:
    print(f"[bench_predict {time.perf_counter() - STARTED:6.0f} s] {message}", flush=True)


def child_env(work: str) -> dict[str, str]:
    env = {**os.environ, "TMPDIR": os.path.join(work, "tmp"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return {**env, "TF_USE_LEGACY_KERAS": "1"}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def wait_quiet(limit: float) -> float:
    """Waits, up to ``limit`` seconds, until other work uses under a tenth of the machine
    for a second; returns the seconds waited."""
    started = time.perf_counter()
    while True:
        busy = busy_cpu_seconds()
        time.sleep(1.0)
        if busy_cpu_seconds() - busy < QUIET * CORES or time.perf_counter() - started >= limit:
            return round(time.perf_counter() - started - 1.0, 1)
        time.sleep(4.0)


def run_child(command: list[str], log: str, env: dict[str, str]) -> dict[str, Any]:
    """Runs ``command`` to its end, output to ``log``: wall seconds, peak RSS (MiB) and CPU
    seconds of the child and its waited-for descendants, and the share of the machine that
    other work used meanwhile."""
    with open(log, "w") as out:
        started, busy = time.perf_counter(), busy_cpu_seconds()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds, busy = time.perf_counter() - started, busy_cpu_seconds() - busy
    with open(log) as f:
        text = f.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}:\n{text[-4000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "wall_seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "others_share": round(max(busy - cpu, 0.0) / (seconds * CORES), 3),
        "threads_warning": THREADS_WARNING in text,
    }


def export_child(weights: str, image_size: int, target: str) -> None:
    """Runs in a child: builds the classifier and saves the serving SavedModel to ``target``."""
    from components.evaluate import export
    from components.train import model

    clf = model.build_classifier("mobilenet_v2", image_size, len(CLASSES), weights=weights, alpha=0.35)
    with export.staged(clf.model, CLASSES, image_size, top_k=len(CLASSES)) as local:
        shutil.copytree(local, target)


def loop_child(saved_model: str, source: str, batch: int, threads: int, out: str) -> None:
    """Runs in a child, after TensorFlow's import: sets its threads, loads the model, lists
    ``source``, calls ``serving_default`` on each batch of files' bytes (the outputs fetched
    as numpy, nothing kept); writes the images and seconds (load, listing, first batch,
    all) to ``out``."""
    import tensorflow as tf

    started = time.perf_counter()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    loaded = time.perf_counter()
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(source) for n in names)
    listed, first, images = time.perf_counter(), 0.0, 0
    for start in range(0, len(paths), batch):
        data = []
        for path in paths[start : start + batch]:
            with open(path, "rb") as f:
                data.append(f.read())
        outputs = serve(images=tf.constant(data, dtype=tf.string))
        images += len(outputs["class_ids"].numpy())
        outputs["probabilities"].numpy(), outputs["class_names"].numpy()
        first = first or time.perf_counter()
    done = time.perf_counter()
    result = {
        "images": images,
        "load_seconds": round(loaded - started, 3),
        "list_seconds": round(listed - loaded, 3),
        "first_batch_seconds": round(first - listed, 3),
        "seconds": round(done - started, 3),
        "steady_images_per_second": round((images - min(batch, images)) / max(done - first, 1e-9), 1),
    }
    with open(out, "w") as f:
        json.dump(result, f)


def loop(work: str, saved_model: str, source: str, batch: int, threads: int, tag: str) -> dict[str, Any]:
    """The plain loop in a child process (:func:`loop_child`)."""
    out = os.path.join(work, "logs", f"{tag}.json")
    command = [sys.executable, "-m", "benchmarks.bench_predict", "--child-loop", saved_model, source]
    command += ["--child-out", out, "--batch-size", str(batch), "--child-threads", str(threads)]
    result = run_child(command, os.path.join(work, "logs", f"{tag}.log"), child_env(work))
    with open(out) as f:
        return {**result, **json.load(f)}


def pipeline(work: str, saved_model: str, source: str, batch: int, sets: dict, tag: str) -> dict[str, Any]:
    """``finetune predict`` in a child process: its summary's seconds and images."""
    output = os.path.join(work, "out", tag)
    command = [sys.executable, "-m", "pipeline.cli", "predict", "--model", saved_model]
    command += ["--input", source, "--output", output, "--set", f"predict.batch_size={batch}"]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    result = run_child(command, os.path.join(work, "logs", f"{tag}.log"), child_env(work))
    with open(os.path.join(output, "summary.json")) as f:
        summary = json.load(f)
    shutil.rmtree(output, ignore_errors=True)
    if summary["predictions"] != summary["inputs"]:
        raise SystemExit(f"{tag}: {summary['predictions']} of {summary['inputs']} predicted: {summary}")
    return {**result, "images": summary["inputs"], "seconds": summary["seconds"]}


def rates(entry: dict[str, Any]) -> dict[str, Any]:
    """Adds images/s from the child's own seconds and from its wall time."""
    entry["images_per_second"] = round(entry["images"] / entry["seconds"], 1)
    entry["images_per_second_wall"] = round(entry["images"] / entry["wall_seconds"], 1)
    return entry


def one_round(args: argparse.Namespace, work: str, model: str, folders: tuple[str, str], i: int) -> dict:
    """Every variant once, back to back (a pipeline's one-batch start-up run right after it);
    the order rotates from round to round."""
    source, startup = folders
    names = [*LOOPS, *PIPELINES]
    measured = {}
    for name in names[i % len(names) :] + names[: i % len(names)]:
        waited = wait_quiet(args.quiet_wait)
        args.quiet_wait -= waited
        tag = f"{name}-r{i}"
        if name in LOOPS:
            entry = rates(loop(work, model, source, args.batch_size, LOOPS[name], tag))
        else:
            entry = rates(pipeline(work, model, source, args.batch_size, PIPELINES[name], tag))
            if name not in NO_STEADY:
                small = pipeline(work, model, startup, args.batch_size, PIPELINES[name], f"{tag}-startup")
                entry["startup_seconds"] = small["seconds"]
                entry["startup_others_share"] = small["others_share"]
                steady = (entry["images"] - small["images"]) / max(entry["seconds"] - small["seconds"], 1e-9)
                entry["steady_images_per_second"] = round(steady, 1)
        measured[name] = entry
        say(
            f"round {i + 1} {name}: {entry['images_per_second']} images/s end to end, "
            f"{entry.get('steady_images_per_second', '-')} steady; wall {entry['wall_seconds']} s; peak RSS "
            f"{entry['peak_rss_mib']} MiB; others used {entry['others_share']:.0%} (waited {waited} s)"
        )
    return measured


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def judge(value: float, target: tuple[str, float]) -> dict[str, Any]:
    met = value <= target[1] if target[0] == "<=" else value >= target[1]
    return {"value": value, "target": f"{target[0]} {target[1]}", "met": met}


def summarize(rounds: list[dict[str, dict]]) -> dict[str, Any]:
    """Medians per variant and per-round ratios (median, spread) per measure, with the
    targets, from the quiet rounds when there are any, else from all."""
    others = [
        max(max(v["others_share"], v.get("startup_others_share", 0)) for v in r.values()) for r in rounds
    ]
    used = [r for r, share in zip(rounds, others, strict=True) if share < QUIET] or rounds  # 0: all
    variants: dict[str, Any] = {}
    for name in used[0]:
        keys = {k for r in used for k, v in r[name].items() if type(v) in (int, float)}
        variants[name] = {k: round(statistics.median(r[name][k] for r in used), 3) for k in sorted(keys)}
        variants[name]["threads_warning"] = any(r[name]["threads_warning"] for r in used)
    result: dict[str, Any] = {
        "rounds_used": len(used),
        "rounds_quiet": sum(share < QUIET for share in others),
        "others_share_per_round": others,
        "variants": variants,
    }
    for measure, key in MEASURES.items():
        two_core = [n for n in TWO_CORE if measure != "steady" or n not in NO_STEADY]
        best = max(two_core, key=lambda n: variants[n][key])

        def ratio(a: str, b: str) -> dict[str, float]:
            return spread([round(r[a][key] / r[b][key], 3) for r in used])  # noqa: B023

        result[measure] = {
            "best_2_core": best,
            "per_core_vs_loop_1": ratio("per_core", "loop_1"),
            **{f"{n}_vs_loop_1": ratio(n, "loop_1") for n in two_core},
            "best_2_core_vs_loop_1": ratio(best, "loop_1"),
            "loop_2_vs_loop_1": ratio("loop_2", "loop_1"),
            "best_2_core_vs_loop_2": ratio(best, "loop_2"),
        }
        result[measure]["targets"] = {
            name: judge(result[measure][name]["median"], target) for name, target in TARGETS.items()
        }
    return result


def measure(args: argparse.Namespace, sizes: list[int], work: str) -> dict[str, Any]:
    """The model, the throughput rounds at the smallest size, then memory at the others."""
    for sub in ("logs", "out", "tmp"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    originals = sample_files(args.data)
    source, startup, model = (os.path.join(work, d) for d in ("images", "startup", "saved_model"))
    say(f"exporting MobileNetV2 0.35 at {args.image_size} px")
    command = [sys.executable, "-m", "benchmarks.bench_predict", "--child-export", model]
    command += ["--weights", args.weights, "--image-size", str(args.image_size)]
    export = run_child(command, os.path.join(work, "logs", "export.log"), child_env(work))
    grow_source(originals, source, 0, sizes[0])
    grow_source(originals, startup, 0, args.batch_size)
    say(f"{sizes[0]} images: {args.rounds} rounds of {', '.join([*LOOPS, *PIPELINES])}")
    rounds = [one_round(args, work, model, (source, startup), i) for i in range(args.rounds)]
    result = {
        "sizes": sizes,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "cpu_cores": CORES,
        "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "classes": len(CLASSES), "export": export},
        "inputs": {"sample": args.data, "sample_files": len(originals), "images": sizes[0]},
        "throughput": summarize(rounds),
        "per_round": rounds,
    }
    memory = {sizes[0]: result["throughput"]["variants"]["default"]}
    for smaller, n in zip(sizes, sizes[1:], strict=False):
        grow_source(originals, source, smaller, n)
        args.quiet_wait -= wait_quiet(args.quiet_wait)
        memory[n] = rates(pipeline(work, model, source, args.batch_size, {}, f"default-{n}"))
        say(
            f"{n} images, default: {memory[n]['images_per_second']} images/s, {memory[n]['peak_rss_mib']} MiB"
        )
    keys = ("images", "seconds", "peak_rss_mib", "others_share")
    result["memory"] = {str(n): {k: memory[n][k] for k in keys} for n in sizes}
    if len(sizes) > 1:
        small, second, large = memory[sizes[0]], memory[sizes[1]], memory[sizes[-1]]
        result["memory"]["peak_rss_largest_vs_smallest"] = judge(
            round(large["peak_rss_mib"] / small["peak_rss_mib"], 3), MEMORY_TARGET
        )
        steady = (second["images"] - small["images"]) / (second["seconds"] - small["seconds"])
        result["memory"]["default_steady_images_per_second_between_sizes"] = round(steady, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="../shared/datasets/beans_raw_sample", help="class folders of JPEGs"
    )
    parser.add_argument("--weights", help="required: MobileNetV2 0.35 ImageNet weights (no top), .h5")
    parser.add_argument("--sizes", default="1000,5000", help="image counts; throughput at the smallest")
    parser.add_argument("--image-size", type=int, default=224, help="the exported model's input size")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call, both sides")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; medians are reported")
    parser.add_argument("--quiet-wait", type=float, default=120, help="seconds in all to wait for quiet")
    add_work_options(parser, "the model, images and logs")
    parser.add_argument("--out", default="runs/bench/predict.json", help="where the JSON result goes")
    parser.add_argument("--child-export", help=argparse.SUPPRESS)
    parser.add_argument("--child-loop", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_export:
        return export_child(args.weights, args.image_size, args.child_export)
    if args.child_loop:
        return loop_child(*args.child_loop, args.batch_size, args.child_threads, args.child_out)
    if not args.weights:
        parser.error("--weights is required")
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 1 or args.rounds < 1:
        parser.error(f"--sizes {args.sizes} --rounds {args.rounds}: expected positive counts")
    with work_folder(args, "bench-predict-") as work:
        say(f"sizes {sizes}, work folder {work}")
        result = measure(args, sizes, work)
    result["total_seconds"] = round(time.perf_counter() - STARTED, 1)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
