"""Pure image core: decode, validate, normalize to RGB, resize and re-encode.

Runs on every Beam worker, once per image. No I/O and no Beam here, so the same function
serves the pipeline, the benchmark's comparison and the unit tests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF")

# Dead-letter reasons raised here (the pipeline adds the ones about labels and reading).
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
CORRUPT_IMAGE = "corrupt_image"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"


class BadImage(Exception):
    """The bytes are not a usable image; ``reason`` is a stable dead-letter reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProcessedImage:
    """An image ready for a TFRecord.

    Attributes:
        encoded: JPEG bytes of the RGB image resized to ``size`` x ``size``.
        source_format: The format of the input (``JPEG``, ``PNG``, ...).
        source_size: ``(width, height)`` of the input as stored (before EXIF orientation).
        pixel_mean: Per-channel mean of the resized pixels (0-255 scale).
        pixel_sq_mean: Per-channel mean of the squared resized pixels (for the variance).
    """

    encoded: bytes
    source_format: str
    source_size: tuple[int, int]
    pixel_mean: tuple[float, float, float]
    pixel_sq_mean: tuple[float, float, float]


# Bytes per pixel of each Pillow mode, for the decoded size known from the header alone.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
DEFAULT_MAX_DECODED_BYTES = 256 * 2**20


def decoded_bytes(image: Image.Image) -> int:
    """What decoding ``image`` at its current size and converting it to 8-bit RGB take in
    memory, from the header alone: pixels times the bytes of a source pixel (channels and bit
    depth counted) plus 3 for the RGB copy."""
    width, height = image.size
    wide = 4 if image.mode in ("I", "F") else 1
    return width * height * (_MODE_BYTES.get(image.mode, len(image.getbands()) * wide) + 3)


def inspect(
    data: bytes, min_size: int = 1, max_decoded: int = DEFAULT_MAX_DECODED_BYTES, draft: int = 0
) -> tuple[Image.Image, tuple[int, int]]:
    """Opens ``data`` and checks what its header says, decoding no pixels: a supported format
    (JPEG, PNG, BMP, GIF), at least ``min_size`` pixels on the shorter side, under Pillow's
    pixel limit, and decoded pixels within ``max_decoded`` bytes (a JPEG at the reduced DCT
    scale that still gives ``draft`` pixels, when ``draft`` is set). Returns the opened image
    and its ``(width, height)`` as stored (before a draft scale or EXIF orientation).

    ``finetune predict`` checks its inputs with this alone (the model decodes them itself), so
    both stages refuse the same files for the same reasons.

    Raises:
        BadImage: with the reason the image cannot be used.
    """
    if not data:
        raise BadImage(EMPTY_FILE, "the file has 0 bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(NOT_AN_IMAGE, f"not a recognised image ({_describe(data)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: under -W error
        raise BadImage(TOO_LARGE, str(e)) from None
    source_format = str(image.format)
    if source_format not in SUPPORTED_FORMATS:
        raise BadImage(
            UNSUPPORTED_FORMAT,
            f"{source_format} is not supported; convert it to one of {', '.join(SUPPORTED_FORMATS)}",
        )
    width, height = image.size
    # Pillow only warns between its limit and twice it. Checked here rather than by turning
    # the warning into an error: warnings.catch_warnings is not thread-safe, and the image
    # threads call this concurrently.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise BadImage(
            TOO_LARGE,
            f"{width}x{height} px is over Pillow's limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS, "
            "a guard against decompression bombs)",
        )
    if min(width, height) < min_size:
        raise BadImage(TOO_SMALL, f"{width}x{height} px is below the minimum of {min_size} px")
    if draft and source_format == "JPEG":
        image.draft("RGB", (draft, draft))  # only sets the decoder's scale: nothing decoded yet
    if decoded_bytes(image) > max_decoded:
        raise BadImage(
            TOO_LARGE,
            f"{width}x{height} px ({image.mode}) would take {decoded_bytes(image) / 2**20:.0f} MiB decoded, "
            f"over preprocess.max_decoded_mb ({max_decoded / 2**20:.0f} MiB)",
        )
    return image, (width, height)


def process_image(
    data: bytes, size: int, min_size: int = 1, quality: int = 95, max_decoded: int = DEFAULT_MAX_DECODED_BYTES
) -> ProcessedImage:
    """Decodes ``data`` and returns it as a ``size`` x ``size`` RGB JPEG.

    JPEG, PNG, BMP and GIF (first frame) are accepted; grayscale, palette, RGBA, CMYK and
    16-bit inputs become 8-bit RGB (transparency is composited on white) and the EXIF
    orientation is applied. Large JPEGs are decoded at a reduced DCT scale that is still at
    least ``size`` pixels, which is several times faster than a full decode. An image whose
    decoded pixels would take more than ``max_decoded`` bytes (from its header, before any
    decoding; a JPEG at its reduced scale) is refused: a small file can declare a huge canvas.

    Raises:
        BadImage: with the reason the image cannot be used.
    """
    image, (width, height) = inspect(data, min_size, max_decoded, draft=size)
    source_format = str(image.format)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright
        rgb = _to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(CORRUPT_IMAGE, f"{source_format} data cannot be decoded: {e}") from None
    mean, sq_mean = _channel_moments(rgb)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return ProcessedImage(
        encoded=out.getvalue(),
        source_format=source_format,
        source_size=(width, height),
        pixel_mean=mean,
        pixel_sq_mean=sq_mean,
    )


_LEVELS = np.arange(256, dtype=np.float64)


def _channel_moments(rgb: Image.Image) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel E[x] and E[x^2] from the 8-bit histogram (exact, and far cheaper than
    converting the pixels to floats)."""
    histogram = np.asarray(rgb.histogram(), dtype=np.float64).reshape(3, 256)
    count = histogram[0].sum()
    mean = histogram @ _LEVELS / count
    sq_mean = histogram @ np.square(_LEVELS) / count
    return tuple(float(v) for v in mean), tuple(float(v) for v in sq_mean)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB, compositing transparency on white."""
    if image.mode.startswith("I;16"):  # 16-bit: integer scaling, no float copy of the canvas
        array = np.asarray(image)
        image = Image.fromarray((array // 257 if array.max() > 255 else array).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode == "I" and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # resizing copies it anyway


def _describe(data: bytes) -> str:
    """What the bytes look like, without quoting them: a dead letter must never carry the
    content of a file that is not an image (a manifest may have named a secret)."""
    head = data[:64]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"{len(data)} bytes of text"
    return f"{len(data)} bytes of binary data with no image signature"
