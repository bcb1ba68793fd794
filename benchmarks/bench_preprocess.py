"""Preprocessing throughput: the Beam + tf.Transform stage against a plain Pillow loop.

The sample (full-size JPEGs) is repeated until there are at least ``--min-images`` files.
Each copy gets a unique trailer after the JPEG end marker, so the bytes (and content
hashes) differ and nothing is dropped as a duplicate, while decoding does exactly the same
work. Reported:

* the plain loop's rate: one process, read + decode + resize + re-encode, same library
  and settings as the pipeline's image core; and the same loop split over 2 threads, the
  ceiling for image threads on this machine (Pillow holds the GIL for part of its work);
* the pipeline's start-up cost: a run on ``--startup-images`` images;
* the pipeline's steady rate per configuration: (N - n_startup) / (T_N - T_startup);
* ``--repeats`` rounds, each timing the plain loop and every configuration back to back
  (this machine's speed drifts by tens of percent over minutes); ratios are the median of
  the per-round ratios;
* the configurations: one in-process Beam worker with 1 image thread and with 2 (the
  stage's default on 2 cores: the threads read and decode, which releases the GIL), and
  Beam's own 2 worker processes with 1 image thread each, for comparison, end to end
  only: their start-up is not a fixed cost, so subtracting the small run's time overstates
  their steady rate;
* ratios: pipeline per-core rate / plain rate, from wall time with 1 image thread (the
  target) and from CPU time (images per CPU-second, every thread and child process
  counted) with 2; 2 image threads / 1 (the "2 workers against 1" target), beside the
  plain loop's own 2 threads / 1; and 2 worker processes' end-to-end time against 2 image
  threads'.

The result goes to ``--out`` as JSON (default ``runs/bench/preprocess.json``) and to stdout.

Usage, from the repository root:
    python -m benchmarks.bench_preprocess --data ../shared/datasets/beans_raw_sample
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageOps

from benchmarks.common import write_result
from components.config import load_config
from components.preprocess import stage


def make_dataset(sample: str, out: str, count: int) -> list[str]:
    """Copies class folders of ``sample`` into ``out`` until there are ``count`` files."""
    originals = sorted(os.path.join(dirpath, name) for dirpath, _, names in os.walk(sample) for name in names)
    if not originals:
        raise SystemExit(f"no images under {sample}")
    paths = []
    for i in range(count):
        src = originals[i % len(originals)]
        label = os.path.basename(os.path.dirname(src))
        dst = os.path.join(out, label, f"{i:06d}_{os.path.basename(src)}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read() + f"\0bench-copy-{i}".encode())
        paths.append(dst)
    return paths


def plain_loop(paths: list[str], size: int, quality: int) -> float:
    """Seconds for one process to decode, resize and re-encode every file with Pillow."""
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        image.save(io.BytesIO(), format="JPEG", quality=quality)
    return time.perf_counter() - started


def plain_threads(paths: list[str], size: int, quality: int, threads: int) -> float:
    """Seconds for the plain loop with the files dealt out to ``threads`` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: plain_loop(paths[i::threads], size, quality), range(threads)))
    return time.perf_counter() - started


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pipeline_seconds(source: str, run_dir: str, size: int, workers: int, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds of the whole preprocessing stage on ``source``."""
    config = load_config(
        None,
        [
            f"data.source={source}",
            f"run_dir={run_dir}",
            f"model.image_size={size}",
            f"preprocess.num_workers={workers}",
            f"preprocess.image_threads={threads}",
            "data.split={train: 0.8, eval: 0.1, test: 0.1}",
        ],
    )
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = stage.run(config)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    assert summary["dead_letter"]["count"] == 0 and summary["duplicates"]["count"] == 0, summary
    return seconds, cpu


# (name, local Beam workers, image threads per worker). One in-process worker is the stage's
# default; its image threads use the cores. Two worker processes (Beam's multi-processing
# mode) with one thread each show the other way of using two cores.
CONFIGS = (
    ("threads_1", 1, 1),
    ("threads_2", 1, 2),
    ("processes_2", 2, 1),
)


def one_round(work: str, big: list[str], size: int, startup_images: int, i: int) -> dict[str, float]:
    """Times the plain loop and every configuration back to back, so a drift in the machine's
    speed hits all of them alike. Returns images/s per configuration (steady), images per
    CPU-second (steady) and start-up."""
    cpu = cpu_seconds()
    plain = plain_loop(big, size, 95)
    rates = {"plain": len(big) / plain, "plain_cpu": len(big) / (cpu_seconds() - cpu)}
    rates["plain_threads_2"] = len(big) / plain_threads(big, size, 95, 2)
    for name, workers, threads in CONFIGS:
        (startup, startup_cpu), (total, total_cpu) = (
            pipeline_seconds(
                os.path.join(work, d), os.path.join(work, "runs", f"{d}-{name}-{i}"), size, workers, threads
            )
            for d in ("small", "big")
        )
        rates[name] = (len(big) - startup_images) / max(total - startup, 1e-9)
        rates[f"{name}_cpu"] = (len(big) - startup_images) / max(total_cpu - startup_cpu, 1e-9)
        rates[f"{name}_startup"] = startup
        rates[f"{name}_total"] = total
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="folder of class folders of full-size JPEGs")
    parser.add_argument("--min-images", type=int, default=2160)
    parser.add_argument("--startup-images", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--out", default="runs/bench/preprocess.json", help="where the JSON result goes")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        big = make_dataset(args.data, os.path.join(work, "big"), args.min_images)
        make_dataset(args.data, os.path.join(work, "small"), args.startup_images)
        plain_loop(big[:20], args.size, 95)  # warm the page cache and Pillow
        rounds = [one_round(work, big, args.size, args.startup_images, i) for i in range(args.repeats)]
        med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}

        def ratio(a: str, b: str) -> float:  # median over rounds of the per-round ratio
            return round(statistics.median(r[a] / r[b] for r in rounds), 3)

        result = {
            "images": len(big),
            "image_size": args.size,
            "cpu_cores": os.cpu_count(),
            "rounds": args.repeats,
            "plain_loop_images_per_second": round(med["plain"], 1),
            "plain_loop_two_threads_images_per_second": round(med["plain_threads_2"], 1),
        }
        for name, _, _ in CONFIGS:
            result[name] = {
                "startup_seconds": round(med[f"{name}_startup"], 2),
                "total_seconds": round(med[f"{name}_total"], 2),
                "end_to_end_images_per_second": round(len(big) / med[f"{name}_total"], 1),
            }
            if name != "processes_2":  # see the module docstring
                result[name]["steady_images_per_second"] = round(med[name], 1)
                result[name]["steady_images_per_cpu_second"] = round(med[f"{name}_cpu"], 1)
        result["plain_loop_images_per_cpu_second"] = round(med["plain_cpu"], 1)
        result["pipeline_per_core_vs_plain"] = ratio("threads_1", "plain")
        result["pipeline_per_cpu_second_vs_plain_two_threads"] = ratio("threads_2_cpu", "plain_cpu")
        result["two_workers_vs_one"] = ratio("threads_2", "threads_1")
        result["plain_loop_two_threads_vs_one"] = ratio("plain_threads_2", "plain")
        result["two_processes_vs_two_threads_end_to_end"] = ratio("threads_2_total", "processes_2_total")
        result["per_round"] = [{k: round(v, 2) for k, v in r.items()} for r in rounds]
        result["targets"] = {
            "pipeline_per_core_vs_plain >= 0.7": result["pipeline_per_core_vs_plain"] >= 0.7,
            "two_workers_vs_one >= 1.6": result["two_workers_vs_one"] >= 1.6,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
