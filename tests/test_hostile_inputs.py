"""Inputs built to exhaust a worker or hang it: each attack made for real, and its outcome.

A small PNG declaring a huge 16-bit canvas, ``/dev/zero`` and a FIFO in the inputs, files far
larger than any image, dangling and folder symlinks: each must end as a dead letter with its
own reason, at a bounded cost, and never crash, hang or vanish from the counts. Image threads
follow the CPUs the process may use (a pod's CPU limit), not the node's cores.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from components.config import load_config
from components.core import storage
from components.core.errors import ConfigError
from components.preprocess import images, transforms
from pipeline import keys
from tests.preprocess_helpers import out, read_jsonl, run_stage

MiB = 2**20


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(path: str, width: int = 9400, height: int = 9500) -> int:
    """A valid 16-bit grayscale PNG of ``width`` x ``height`` black pixels, compressed row by
    row (never held whole): about 200 KB on disk, 170 MiB of samples once decoded."""
    compressor, body = zlib.compressobj(9), []
    row = b"\0" * (1 + width * 2)  # filter byte, then 2 bytes a pixel
    for _ in range(height):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
    png += _png_chunk(b"IDAT", b"".join(body)) + _png_chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
    return len(png)


def _jpeg(path: str, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def _sparse(path: str, size: int) -> None:
    """A file of ``size`` bytes that takes no disk (a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_small_png_declaring_a_huge_16_bit_canvas_is_refused_from_its_header(tmp_path):
    path = str(tmp_path / "bomb.png")
    size = _png_bomb(path)
    assert size < 400_000
    data = open(path, "rb").read()
    started = time.perf_counter()
    with pytest.raises(images.BadImage) as refused:
        images.process_image(data, 64)
    assert time.perf_counter() - started < 0.5  # the header only: decoding takes seconds
    assert refused.value.reason == images.TOO_LARGE
    assert "9400x9500 px (I;16) would take 426 MiB decoded" in refused.value.detail
    # The same canvas is fine when the budget allows it, and a normal photo under the default.
    _png_bomb(path, 400, 300)
    assert images.process_image(open(path, "rb").read(), 64).source_size == (400, 300)


def test_special_files_and_oversized_files_are_dead_letters_at_a_bounded_cost(tmp_path):
    source = tmp_path / "images"
    for i in range(8):
        _jpeg(str(source / ("cat" if i % 2 else "dog") / f"{i}.jpg"), i)
    os.mkfifo(source / "cat" / "fifo.jpg")  # opening it would block forever
    (source / "cat" / "gone.jpg").symlink_to(source / "cat" / "nowhere.jpg")  # dangling
    (source / "elsewhere").mkdir()
    (source / "dog" / "folder_link").symlink_to(source / "elsewhere")
    _sparse(str(source / "dog" / "huge.jpg"), 3 * MiB)  # the listing knows its size: never read
    summary = run_stage(
        str(source), str(tmp_path / "run"), "preprocess.max_file_mb=1", "preprocess.max_bad_fraction=1"
    )
    dead = {
        os.path.basename(d["uri"]): d for d in read_jsonl(out(str(tmp_path / "run"), "dead_letter.jsonl"))
    }
    assert {name: d["reason"] for name, d in dead.items()} == {
        "fifo.jpg": "not_a_file",
        "gone.jpg": "unreadable",
        "folder_link": "not_a_file",
        "huge.jpg": "file_too_large",
    }
    assert "is a FIFO, not a regular file" in dead["fifo.jpg"]["detail"]
    assert sum(summary["records"].values()) == 8 and summary["inputs"] == 8 + 4

    # A manifest gives no sizes: the read itself stops at the limit, and /dev/zero (allowed
    # here, to reach the reader) is refused unread.
    _sparse(str(tmp_path / "big.jpg"), 3 * MiB)
    rows = [f"images/{'cat' if i % 2 else 'dog'}/{i}.jpg,{'cat' if i % 2 else 'dog'}" for i in range(8)]
    rows += ["/dev/zero,cat", "big.jpg,dog"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    settings = [f"data.source={tmp_path / 'm.csv'}", "run_dir=unused", "data.allowed_roots=[/dev]"]
    assert len(keys.input_fingerprint(load_config(None, settings))) == 64  # /dev/zero not read
    summary = run_stage(
        str(tmp_path / "m.csv"),
        str(tmp_path / "run_m"),
        "preprocess.max_file_mb=1",
        "preprocess.max_bad_fraction=1",
        "data.allowed_roots=[/dev]",
    )
    assert summary["dead_letter"]["by_reason"] == {"file_too_large": 1, "not_a_file": 1}
    dead = read_jsonl(out(str(tmp_path / "run_m"), "dead_letter.jsonl"))
    assert all(d["detail"] and "\x00" not in d["detail"] for d in dead)  # no content bytes


def test_bounded_reads_and_streamed_digests(tmp_path):
    with pytest.raises(storage.NotAFile, match="character device"):
        storage.read_bytes("/dev/zero", max_bytes=MiB)
    (tmp_path / "source").mkdir()
    big = str(tmp_path / "source" / "big")
    _sparse(big, 1024 * MiB)
    with pytest.raises(storage.FileTooLarge):
        storage.read_bytes(big, max_bytes=MiB)
    # Hashing 1 GiB for the input fingerprint streams it: the process grows by chunks, not by the file.
    probe = (
        "import resource, sys; from pipeline import keys; from components.config import load_config; "
        "config = load_config(None, [f'data.source={sys.argv[1]}', 'run_dir=unused']); "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "scan = keys.scan_inputs(config); "
        "print(scan.hashed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "source")],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    )
    hashed, grown_mib = (int(v) for v in result.stdout.split())
    assert hashed == 1 and grown_mib < 100, result.stdout


def test_image_threads_follow_the_cgroup_cpu_quota(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # a pod's limit of 1.5 CPUs
    assert transforms.available_cpus(str(v2)) == min(cpus, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert transforms.available_cpus(str(v2)) == cpus
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert transforms.available_cpus(str(v1)) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert transforms.available_cpus(str(v1)) == cpus
    assert transforms.available_cpus(str(tmp_path / "none")) == cpus
    assert 1 <= transforms.default_image_threads() <= min(cpus, transforms.MAX_DEFAULT_THREADS)


def test_the_limits_are_configuration_with_safe_defaults():
    config = load_config(None, ["data.source=/d", "run_dir=/r"])
    assert (config.preprocess.max_file_mb, config.preprocess.max_decoded_mb) == (64, 256)
    with pytest.raises(ConfigError, match="preprocess.max_file_mb: 0 must be between 1"):
        load_config(None, ["data.source=/d", "run_dir=/r", "preprocess.max_file_mb=0"])


def test_a_manifest_reads_nothing_outside_its_folder_and_quotes_nothing(tmp_path):
    # An attacker's manifest: system files, the process environment, a path climbing out of the
    # manifest's folder, and a symlink inside it pointing out; none of it may be read, become
    # training data, or be quoted in a dead letter.
    data = tmp_path / "data"
    for i in range(8):
        _jpeg(str(data / "images" / f"{i}.jpg"), 100 + i)
    _jpeg(str(tmp_path / "outside" / "x.jpg"), 200)
    (data / "images" / "link.jpg").symlink_to(tmp_path / "outside" / "x.jpg")
    (data / "notes.txt").write_text("SHELL=/bin/bash\nAPI_TOKEN=hunter2\n")  # inside, but not an image
    rows = [f"images/{i}.jpg,{'cat' if i % 2 else 'dog'}" for i in range(8)]
    rows += ["/etc/passwd,cat", "/proc/self/environ,dog", "../outside/x.jpg,cat", "images/link.jpg,dog"]
    rows += ["notes.txt,cat"]
    (data / "m.csv").write_text("\n".join(rows) + "\n")
    run_dir = str(tmp_path / "run")
    summary = run_stage(str(data / "m.csv"), run_dir, "preprocess.max_bad_fraction=1")
    dead = read_jsonl(out(run_dir, "dead_letter.jsonl"))
    reasons = {os.path.basename(d["uri"]): d["reason"] for d in dead}
    assert reasons == {
        "passwd": "outside_source",
        "environ": "outside_source",
        "x.jpg": "outside_source",
        "link.jpg": "outside_source",
        "notes.txt": "not_an_image",
    }
    assert sum(summary["records"].values()) == 8  # only the images inside
    text = storage.read_text(out(run_dir, "dead_letter.jsonl"))
    for secret in ("root:", "SHELL", "hunter2", "API_TOKEN"):
        assert secret not in text
    assert "data.allowed_roots" in next(d["detail"] for d in dead if d["reason"] == "outside_source")

    # The same rows are read once the user allows the folder.
    summary = run_stage(
        str(data / "m.csv"),
        str(tmp_path / "run2"),
        "preprocess.max_bad_fraction=1",
        f"data.allowed_roots=[{tmp_path / 'outside'}]",
    )
    assert sum(summary["records"].values()) == 8 + 1  # x.jpg once: the link and the row are one image
