"""The serving graph's decoding (``components/evaluate/decode.py``) against a full decode.

The export decodes a JPEG at the DCT scale the preprocessing stage's Pillow ``draft`` picks,
reads the EXIF orientation and composites transparency. The reference is what the graph did
before and what a plain client does: ``tf.io.decode_image`` at full size, then the same
antialiased resize. Real photos (the beans originals, 500x500) are re-encoded at larger sizes
as well, since phone photos are 3,000-4,000 px wide. For each size, in alternating rounds on
the same batch: images/s of both graphs (one ``tf.function`` each, over a batch, as
``serving_default`` runs them), and how far each lands from the pixels the model was trained
on (``process_image``, the preprocessing stage's core): the mean absolute difference in 0-255
levels. Results go to ``runs/bench/decode.json``.

    python -m benchmarks.bench_decode --data ../shared/datasets/beans_raw_sample
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import statistics
import time
from typing import Any

from benchmarks.common import ROOT, paired, say, write_result


def encoded_batch(files: list[str], side: int) -> list[bytes]:
    """Each photo as a ``side``-px-wide JPEG (quality 92, as a camera writes), 4:3."""
    from PIL import Image

    batch = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if side != image.width:
                image = image.resize((side, side * 3 // 4), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=92)
            batch.append(out.getvalue())
    return batch


def graphs(size: int) -> dict[str, Any]:
    import tensorflow as tf

    from components.evaluate.decode import decode_images

    spec = tf.TensorSpec([size, size, 3], tf.float32)

    def full(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), tf.float32)
        return tf.image.resize(image, [size, size], method="bilinear", antialias=True)

    return {
        "export": tf.function(lambda batch: decode_images(batch, size)),
        "full_decode": tf.function(lambda batch: tf.map_fn(full, batch, fn_output_signature=spec)),
    }


def skew(batch: list[bytes], decoded: Any, size: int) -> float:
    """Median over the batch of the mean absolute difference to the trained pixels."""
    import numpy as np
    from PIL import Image

    from components.preprocess.images import process_image

    diffs = []
    for data, served in zip(batch, decoded, strict=True):
        trained = np.asarray(Image.open(io.BytesIO(process_image(data, size).encoded)), np.float32)
        diffs.append(float(np.abs(trained - served).mean()))
    return round(statistics.median(diffs), 2)


def measure(batch: list[bytes], size: int, rounds: int) -> dict[str, Any]:
    import tensorflow as tf

    tensor = tf.constant(batch)
    fns = graphs(size)
    result: dict[str, Any] = {"skew": {name: skew(batch, f(tensor).numpy(), size) for name, f in fns.items()}}
    timed = []
    for r in range(rounds):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        entry = {}
        for name in names:
            started = time.perf_counter()
            fns[name](tensor).numpy()
            entry[name] = {"images_per_s": len(batch) / (time.perf_counter() - started)}
        timed.append(entry)
    keys = ("export_images_per_s", "full_decode_images_per_s", "speedup")
    result["speed"] = paired(timed, "images_per_s", "export", "full_decode", keys)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a folder of JPEG photos (class folders or flat)")
    parser.add_argument("--images", type=int, default=48, help="photos per batch (default 48)")
    parser.add_argument("--sides", default="500,1500,3000", help="photo widths (default 500,1500,3000)")
    parser.add_argument("--size", type=int, default=224, help="the trained image size (default 224)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default 5)")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "decode.json"))
    args = parser.parse_args()
    files = sorted(glob.glob(os.path.join(args.data, "**", "*.jp*g"), recursive=True))[: args.images]
    if not files:
        raise SystemExit(f"--data {args.data}: no .jpg or .jpeg files")
    result: dict[str, Any] = {"images": len(files), "size": args.size, "sides": {}}
    for side in (int(s) for s in args.sides.split(",")):
        say(f"{side} px: encoding {len(files)} photos")
        entry = measure(encoded_batch(files, side), args.size, args.rounds)
        result["sides"][str(side)] = entry
        speed = entry["speed"]
        say(
            f"{side} px: export {speed['export_images_per_s']:.0f} images/s, full decode "
            f"{speed['full_decode_images_per_s']:.0f}: {speed['speedup']}x; skew {entry['skew']}"
        )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
