"""Builds image folders with every kind of bad input and the valid odd ones.

Each builder returns the expected outcome per file: ``None`` for a file that must end in a
TFRecord, or the dead-letter reason it must get.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def _save(path: str, image: Image.Image, fmt: str, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **kwargs)
    return out.getvalue()


def rotated_jpeg() -> bytes:
    """A 80x40 JPEG, left half red and right half blue, with EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display": once applied, red is on
    top and blue at the bottom.
    """
    image = Image.new("RGB", (80, 40), BLUE)
    image.paste(Image.new("RGB", (40, 40), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(image, quality=95, exif=exif.tobytes())


def make_odd_and_bad(root: str) -> dict[str, str | None]:
    """Class folders ``alpha/`` and ``beta/`` holding valid odd files and every bad kind."""
    expected: dict[str, str | None] = {}

    def valid(rel: str) -> str:
        expected[rel] = None
        return os.path.join(root, rel)

    def bad(rel: str, reason: str) -> str:
        expected[rel] = reason
        return os.path.join(root, rel)

    _save(valid("alpha/rgb.jpg"), _noise((64, 48), 1), "JPEG")
    _save(valid("alpha/gray.jpg"), _noise((50, 60), 2).convert("L"), "JPEG")
    rgba = _noise((48, 48), 3).convert("RGBA")
    rgba.putalpha(Image.new("L", (48, 48), 0))  # fully transparent: must become white
    _save(valid("alpha/transparent_rgba.png"), rgba, "PNG")
    _save(valid("alpha/palette.png"), _noise((40, 40), 4).convert("P"), "PNG")
    _save(valid("alpha/cmyk.jpg"), _noise((48, 40), 5).convert("CMYK"), "JPEG")
    _save(valid("alpha/png_named.jpg"), _noise((40, 52), 6), "PNG")
    with open(valid("alpha/rotated.jpg"), "wb") as f:
        f.write(rotated_jpeg())
    _save(valid("alpha/bitmap.bmp"), _noise((45, 45), 7), "BMP")
    frames = [Image.new("RGB", (40, 40), GREEN), Image.new("RGB", (40, 40), RED)]
    frames[0].save(valid("alpha/animated.gif"), format="GIF", save_all=True, append_images=frames[1:])
    gray16 = Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16))
    _save(valid("alpha/gray16.png"), gray16, "PNG")
    for i in range(4):
        _save(valid(f"beta/photo{i}.jpg"), _noise((56, 56), 10 + i), "JPEG")

    open(bad("beta/empty.jpg", "empty_file"), "wb").close()
    with open(bad("beta/truncated.jpg", "corrupt_image"), "wb") as f:
        f.write(_jpeg_bytes(_noise((64, 64), 20))[:700])
    with open(bad("beta/garbage.png", "not_an_image"), "wb") as f:
        f.write(np.random.default_rng(21).integers(0, 255, 2048, dtype=np.uint8).tobytes())
    with open(bad("beta/notes.jpg", "not_an_image"), "w") as f:
        f.write("these are not the pixels you are looking for\n")
    _save(bad("beta/tiny.png", "too_small"), _noise((8, 8), 22), "PNG")
    _save(bad("beta/scan.tiff", "unsupported_format"), _noise((40, 40), 23), "TIFF")
    _save(bad("loose.jpg", "missing_label"), _noise((40, 40), 24), "JPEG")
    return expected
