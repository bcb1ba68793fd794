"""Scale: how preprocessing, the training input and the input fingerprint grow with the data.

For each of ``--sizes`` (default 3,000, 30,000 and 100,000 images), smallest first:

1. Inputs. Byte-distinct copies of the sample's photos (``--data``: class folders, kept, so
   every copy has its label), made as ``benchmarks.bench_preprocess`` makes them: a unique
   trailer after the JPEG end marker, so the content hashes differ (nothing is dropped as a
   duplicate) while decoding does the same work. The sample's originals are used as they
   are, not downscaled: beans_raw_sample's photos are already 500x500 (~137 KB each), the
   size the pipeline's ~600 images/s on 2 cores was measured at. One folder grows from one
   size to the next (the first N copies are the same files at every size).
2. Preprocessing. ``python -m pipeline.cli preprocess`` (what ``finetune preprocess`` runs)
   in a child process, ``model.image_size=--image-size``, every other key at its default
   (``preprocess.num_shards`` too). Reported: wall time, the stage's own seconds and
   images/s from its ``summary.json`` (without the child's imports), peak RSS, records,
   shards and TFRecord bytes per split, and the disk the run took at its peak (the child's
   TMPDIR, where the spill files go, is under ``--work``).
3. Training input. A child process iterates one epoch of the train split's records through
   ``components.train.data.image_dataset`` at the stored size (the records are stored at
   the preprocessing size; decoding is the input's work), batch 64, training order, no
   repeat and no in-memory cache (``cache=NO_CACHE``): images/s and peak RSS.
4. Input fingerprint, at the largest size only: ``pipeline.keys.scan_inputs`` on the local
   source, cold (the files evicted from the page cache with ``posix_fadvise``, no stat
   cache yet; with the stat cache under the run directory, as ``finetune run`` keeps it),
   warm (a second call, nothing changed), and hashing every file without the stat cache
   (the page cache as the cold call left it); ``values_agree`` says whether all three match.

Peak RSS is ``ru_maxrss`` from ``os.wait4`` on each child: the largest resident set of the
child or any process it waited for (the local Beam worker runs in the child's process).
Ratios, each with its target and whether it was met (reported, never asserted): peak RSS of
preprocessing at the largest size / the smallest (<= 1.15), the stage's images/s at the
largest size / the second largest (>= 0.9), peak RSS of the training input at the largest
size / the smallest (flat: <= 1.15).

Generated images and run directories are deleted at the end unless ``--keep``. The result
goes to ``--out`` as JSON (default ``runs/bench/scale.json``) and to stdout.

Usage, from the repository root:
    python -m benchmarks.bench_scale --data ../shared/datasets/beans_raw_sample
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from PIL import Image

from benchmarks.common import add_work_options, work_folder, write_result

STARTED = time.perf_counter()
MIB = 1024 * 1024
TARGETS = {  # ratio -> (comparison, bound)
    "preprocess_peak_rss_largest_vs_smallest": ("<=", 1.15),
    "preprocess_images_per_second_largest_vs_second_largest": (">=", 0.9),
    "train_input_peak_rss_largest_vs_smallest": ("<=", 1.15),
}


def say(message: str) -> None:
    print(f"[bench_scale {time.perf_counter() - STARTED:6.0f} s] {message}", flush=True)


def sample_files(sample: str) -> list[str]:
    """The sample's photos, sorted; each in a class folder."""
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(sample) for n in names)
    if not files:
        raise SystemExit(f"--data {sample}: no images")
    return files


def grow_source(originals: list[str], source: str, start: int, count: int) -> None:
    """Adds copies ``start`` .. ``count - 1`` of the originals (each with a unique trailer) to
    ``source``, in the originals' class folders."""
    contents = {}
    for path in originals:
        with open(path, "rb") as f:
            contents[path] = f.read()
    for i in range(start, count):
        src = originals[i % len(originals)]
        dst = os.path.join(source, os.path.basename(os.path.dirname(src)), f"{i:07d}_{os.path.basename(src)}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(contents[src] + f"\0bench-copy-{i}".encode())


def run_child(command: list[str], log: str, env: dict[str, str]) -> dict[str, Any]:
    """Runs ``command`` to its end, output to ``log``: wall seconds, peak RSS (MiB) of the
    child and its waited-for descendants, and the peak disk space used meanwhile (from the
    file system's free space, sampled every 0.2 s: other writers on it count too)."""
    disk = os.path.dirname(log)
    free_before = low = shutil.disk_usage(disk).free
    with open(log, "w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            low = min(low, shutil.disk_usage(disk).free)
            time.sleep(0.2)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"{' '.join(command)} exited {child.returncode}:\n{tail}")
    return {
        "wall_seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "peak_disk_mib": round((free_before - low) / MIB, 1),
    }


def preprocess(source: str, run_dir: str, image_size: int, env: dict[str, str]) -> dict[str, Any]:
    """The preprocessing stage on ``source`` in a child process, and what it wrote."""
    command = [sys.executable, "-m", "pipeline.cli", "preprocess"]
    for setting in (f"data.source={source}", f"run_dir={run_dir}", f"model.image_size={image_size}"):
        command += ["--set", setting]
    result = run_child(command, run_dir + "-preprocess.log", env)
    with open(os.path.join(run_dir, "preprocess", "summary.json")) as f:
        summary = json.load(f)
    splits: dict[str, dict[str, int]] = {}
    for name, shard in summary["shards"].items():
        split = splits.setdefault(name.split("/")[0], {"records": 0, "shards": 0, "bytes": 0})
        split["shards"] += 1
        split["bytes"] += shard["bytes"]
    for split, records in summary["records"].items():
        splits.setdefault(split, {"records": 0, "shards": 0, "bytes": 0})["records"] = records
    inputs = summary["inputs"]
    return {
        **result,
        "images_per_second_wall": round(inputs / result["wall_seconds"], 1),
        "stage_seconds": summary["seconds"],
        "images_per_second": round(inputs / summary["seconds"], 1),
        "inputs": inputs,
        "dead_letters": summary["dead_letter"]["count"],
        "duplicates": summary["duplicates"]["count"],
        "splits": splits,
        "tfrecord_bytes": sum(s["bytes"] for s in splits.values()),
    }


def train_input(prep_dir: str, image_size: int, batch: int, env: dict[str, str]) -> dict[str, Any]:
    """One epoch of the training input in a child process (:func:`train_input_child`)."""
    out = prep_dir + "-train-input.json"
    command = [sys.executable, "-m", "benchmarks.bench_scale", "--child", prep_dir]
    command += ["--child-out", out, "--image-size", str(image_size), "--batch-size", str(batch)]
    result = run_child(command, prep_dir + "-train-input.log", env)
    with open(out) as f:
        measured = json.load(f)
    del result["peak_disk_mib"]
    return {**result, **measured, "images_per_second": round(measured["images"] / measured["seconds"], 1)}


def train_input_child(prep_dir: str, image_size: int, batch: int, out: str) -> None:
    """Runs in the child: iterates the train split once, no in-memory cache; writes the
    images seen, batches, files and seconds (from building the dataset to its end) to ``out``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from components.train import data

    files = data.record_files(prep_dir, "train")
    started = time.perf_counter()
    dataset = data.image_dataset(files, image_size, batch, training=True, repeat=False, cache=data.NO_CACHE)
    images = batches = 0
    for x, _ in dataset:
        images += int(x.shape[0])
        batches += 1
    seconds = time.perf_counter() - started
    with open(out, "w") as f:
        result = {"images": images, "batches": batches, "files": len(files), "seconds": round(seconds, 2)}
        json.dump(result, f)


def evict(source: str) -> None:
    """Drops ``source``'s files from the page cache (written back first), so the next read
    comes from the disk."""
    os.sync()
    for folder, _, names in os.walk(source):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fingerprint(source: str, run_dir: str) -> dict[str, Any]:
    """Times the input fingerprint of ``source``: cold, warm and without the stat cache."""
    from components.config import load_config
    from pipeline import keys

    config = load_config(None, [f"data.source={source}", f"run_dir={run_dir}"])
    evict(source)
    result: dict[str, Any] = {"files": sum(len(names) for _, _, names in os.walk(source))}
    values = set()
    for name, cache in (
        ("cold", keys.fingerprint_cache(run_dir)),
        ("warm", keys.fingerprint_cache(run_dir)),
        ("no_stat_cache", None),
    ):
        started = time.perf_counter()
        found = keys.scan_inputs(config, cache)
        seconds = time.perf_counter() - started
        values.add(found.value)
        result[name] = {"seconds": round(seconds, 3), "hashed": found.hashed, "cached": found.cached}
        say(f"fingerprint {name}: {seconds:.2f} s ({found.describe()})")
    result["values_agree"] = len(values) == 1
    return result


def ratios(per_size: dict[int, dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The scale ratios and whether each meets its target (needs two sizes at least)."""
    small, second, large = (per_size[n] for n in (sizes[0], sizes[-2], sizes[-1]))
    values = {
        "preprocess_peak_rss_largest_vs_smallest": large["preprocess"]["peak_rss_mib"]
        / small["preprocess"]["peak_rss_mib"],
        "preprocess_images_per_second_largest_vs_second_largest": large["preprocess"]["images_per_second"]
        / second["preprocess"]["images_per_second"],
        "train_input_peak_rss_largest_vs_smallest": large["train_input"]["peak_rss_mib"]
        / small["train_input"]["peak_rss_mib"],
    }
    out: dict[str, Any] = {}
    for name, value in values.items():
        op, bound = TARGETS[name]
        met = value <= bound if op == "<=" else value >= bound
        out[name] = {"value": round(value, 3), "target": f"{op} {bound}", "met": met}
    return out


def measure(args: argparse.Namespace, sizes: list[int], work: str) -> dict[str, Any]:
    """Every size in turn, then the fingerprint at the largest; returns the result."""
    originals = sample_files(args.data)
    with Image.open(originals[0]) as first:
        shape = f"{first.width}x{first.height}"
    mean_bytes = sum(os.path.getsize(p) for p in originals) / len(originals)
    source, tmp = os.path.join(work, "images"), os.path.join(work, "tmp")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    env = {**os.environ, "TMPDIR": tmp, "TF_CPP_MIN_LOG_LEVEL": "2"}
    per_size: dict[int, dict[str, Any]] = {}
    made = 0
    for n in sizes:
        say(f"{n} images: generating {n - made} copies")
        started = time.perf_counter()
        grow_source(originals, source, made, n)
        made, entry = n, {"generate_seconds": round(time.perf_counter() - started, 2)}
        run_dir = os.path.join(work, "runs", str(n))
        say(f"{n} images: preprocess")
        entry["preprocess"] = p = preprocess(source, run_dir, args.image_size, env)
        say(
            f"{n} images: preprocess {p['wall_seconds']} s wall, {p['images_per_second']} images/s "
            f"(stage), peak RSS {p['peak_rss_mib']} MiB, {p['tfrecord_bytes'] / MIB:.0f} MiB of records"
        )
        say(f"{n} images: training input, one epoch")
        entry["train_input"] = t = train_input(
            os.path.join(run_dir, "preprocess"), args.image_size, args.batch_size, env
        )
        say(f"{n} images: training input {t['images_per_second']} images/s, peak RSS {t['peak_rss_mib']} MiB")
        if n == sizes[-1]:
            say(f"{n} images: input fingerprint")
            entry["fingerprint"] = fingerprint(source, os.path.join(work, "runs", "fingerprint"))
        per_size[n] = entry
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "sizes": sizes,
        "image_size": args.image_size,
        "cpu_cores": os.cpu_count(),
        "inputs": {
            "sample": args.data,
            "sample_files": len(originals),
            "photo": f"{shape} JPEG originals, copied as they are (not downscaled), unique trailer each",
            "mean_bytes_per_image": round(mean_bytes),
            "source_bytes_at_largest": sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(source) for f in fs
            ),
        },
        "train_input_settings": {"batch_size": args.batch_size, "cache": "none", "training": True},
        "per_size": {str(n): per_size[n] for n in sizes},
        "ratios": ratios(per_size, sizes) if len(sizes) > 1 else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="required: the sample, class folders of full-size JPEGs")
    parser.add_argument("--sizes", default="3000,30000,100000", help="comma-separated image counts")
    add_work_options(parser, "the generated images and run directories")
    parser.add_argument("--image-size", type=int, default=224, help="model.image_size for preprocessing")
    parser.add_argument("--batch-size", type=int, default=64, help="the training input's batch")
    parser.add_argument("--out", default="runs/bench/scale.json", help="where the JSON result goes")
    parser.add_argument("--child", metavar="PREP_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train_input_child(args.child, args.image_size, args.batch_size, args.child_out)
        return
    if not args.data:
        parser.error("--data is required")
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--sizes {args.sizes}: expected positive image counts, e.g. 3000,30000,100000")
    with work_folder(args, "bench-scale-") as work:
        say(f"sizes {sizes}, work folder {work}")
        result = measure(args, sizes, work)
    result["total_seconds"] = round(time.perf_counter() - STARTED, 1)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
