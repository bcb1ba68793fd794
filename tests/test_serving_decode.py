"""The serving graph decodes an image file as the preprocessing stage does (no train/serve skew).

Pillow (the preprocessing stage's decoder) is the reference: every orientation case states the
expected value and checks that Pillow reads the same; every pixel case compares the graph's
pixels with ``process_image``'s on the same bytes.
"""

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from components.evaluate import export
from components.evaluate.decode import decode_images, exif_orientations, orient
from components.preprocess.images import process_image
from tests.image_fixtures import rotated_jpeg

SIZE = 48
# Pillow's and TensorFlow's resizing and JPEG codecs differ by about 2 levels on average on
# these images; a skipped orientation or alpha channel differs by 25 or more.
SAME, DIFFERENT = 3.0, 20.0


def _scene(width: int = 90, height: int = 60) -> Image.Image:
    """A smooth gradient with a red block near the top left: no two orientations look alike."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.uint8)
    pixels[4 : height // 3, 4 : width // 3] = (230, 30, 30)
    return Image.fromarray(pixels, "RGB")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _tiff(orientation: int, order: bytes = b"II", kind: int = 3, count: int = 1, ifd: int = 8) -> bytes:
    """A TIFF structure whose first IFD holds one orientation entry (and a make tag before it)."""
    e = "<" if order == b"II" else ">"
    value = struct.pack(e + "H", orientation) + b"\0\0" if kind == 3 else struct.pack(e + "I", orientation)
    entries = struct.pack(e + "HHI", 0x010F, 2, 4) + b"abc\0"  # Make: "abc" (an ASCII entry)
    entries += struct.pack(e + "HHI", 0x0112, kind, count) + value
    head = order + struct.pack(e + "HI", 42, ifd)
    return head + b"\0" * (ifd - 8) + struct.pack(e + "H", 2) + entries + struct.pack(e + "I", 0)


def _jpeg_with(*segments: bytes, fill: bool = False) -> bytes:
    """A Pillow JPEG with the given APP segments (marker + payload) right after its start."""
    body = _encode(_scene(), "JPEG", quality=95)
    extra = b"".join(s[:2] + struct.pack(">H", len(s[2:]) + 2) + s[2:] for s in segments)
    return body[:2] + (b"\xff" if fill else b"") + extra + body[2:]


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + payload


def _png_with_exif(tiff: bytes) -> bytes:
    """A PNG with an ``eXIf`` chunk before its image data."""
    body = _encode(_scene(), "PNG")
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    at = body.index(b"IDAT") - 4
    return body[:at] + chunk + body[at:]


def _served(data: bytes, size: int = SIZE) -> np.ndarray:
    return decode_images(tf.constant([data]), size)[0].numpy()


def _pillow_orientation(data: bytes) -> int:
    """What ``ImageOps.exif_transpose`` acts on: the orientation when it is one of 2-8, else 1."""
    value = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    return value if value in range(2, 9) else 1


ORIENTATION_CASES = {
    "big-endian": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(6, order=b"MM"))), 6),
    "little-endian": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(8))), 8),
    "stored as a LONG": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(3, kind=4))), 3),
    "IFD after a gap": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(5, ifd=40))), 5),
    "after JFIF, XMP and ICC segments": (
        lambda: _jpeg_with(
            b"\xff\xe0JFIF\0\1\1\0\0\1\0\1\0\0",
            _app1(b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"),
            b"\xff\xe2ICC_PROFILE\0" + bytes(300),
            _app1(b"Exif\0\0" + _tiff(6)),
        ),
        6,
    ),
    "a fill byte before the marker": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(7)), fill=True), 7),
    "the first Exif segment wins": (
        lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(3)), _app1(b"Exif\0\0" + _tiff(6))),
        3,
    ),
    "png eXIf chunk": (lambda: _png_with_exif(_tiff(6)), 6),
    "png eXIf chunk with an Exif prefix": (lambda: _png_with_exif(b"Exif\0\0" + _tiff(8)), 8),
    "out of range (9)": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(9))), 1),
    "zero": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(0))), 1),
    "two values (the first is used)": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(6, count=2))), 6),
    "an ASCII value": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(6, kind=2))), 1),
    "IFD past the segment": (lambda: _jpeg_with(_app1(b"Exif\0\0" + _tiff(6)[:8])), 1),
    "no metadata": (lambda: _encode(_scene(), "JPEG"), 1),
    "png without eXIf": (lambda: _encode(_scene(), "PNG"), 1),
    "gif": (lambda: _encode(_scene().convert("P"), "GIF"), 1),
    "bmp": (lambda: _encode(_scene(), "BMP"), 1),
}


@pytest.mark.parametrize("case", sorted(ORIENTATION_CASES))
def test_orientation_is_read_as_pillow_reads_it(case):
    build, expected = ORIENTATION_CASES[case]
    data = build()
    assert _pillow_orientation(data) == expected  # the reference agrees with the stated value
    assert int(exif_orientations(tf.constant([data]))[0]) == expected


def test_one_batch_reads_each_image_on_its_own():
    """The walk runs over the whole batch at once: each image keeps its own answer, however
    long the others' walks are."""
    cases = sorted(ORIENTATION_CASES)
    files = [ORIENTATION_CASES[c][0]() for c in cases] * 2
    got = exif_orientations(tf.constant(files)).numpy().tolist()
    assert got == [ORIENTATION_CASES[c][1] for c in cases] * 2
    assert exif_orientations(tf.constant([], tf.string)).shape == (0,)


def _damaged(corpus: list[bytes], count: int, seed: int) -> list[bytes]:
    """``count`` copies of corpus files with 1-6 bytes changed, cut or inserted in their
    first 500 bytes (where the headers are)."""
    rng = random.Random(seed)
    files = []
    for _ in range(count):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 6)):
            at, kind = rng.randrange(min(len(data), 500)), rng.random()
            if kind < 0.7:
                data[at] = rng.randrange(256)
            elif kind < 0.85:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
        files.append(bytes(data))
    return files


def test_damaged_headers_read_as_pillow_reads_them():
    """On every damaged file Pillow still opens, the graph reads Pillow's orientation; on
    the others it reads one of 1-8 without an error (the preprocessing stage rejects them)."""
    files = _damaged([build() for build, _ in ORIENTATION_CASES.values()], 1500, seed=7)
    got = np.concatenate([exif_orientations(tf.constant(files[i : i + 500])).numpy() for i in (0, 500, 1000)])
    assert ((got >= 1) & (got <= 8)).all()
    compared, turned = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about each corrupt EXIF block
        for data, orientation in zip(files, got.tolist(), strict=True):
            try:
                expected = _pillow_orientation(data)
            except Exception:  # Pillow cannot open it
                continue
            assert orientation == expected, data[:80]
            compared, turned = compared + 1, turned + (expected != 1)
    assert compared > 900 and turned > 300  # most files were compared, many of them turned


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"\xff\xd8\xff\xe1\xff\xffExif\0\0II*\0",  # a segment claiming 64 KB of a 16-byte file
        b"\xff\xd8\xff\xe1\x00\x10Exif\0\0II*\0\xff\xff\xff\x7f",  # IFD offset 2 GB away
        b"\x89PNG\r\n\x1a\n\xff\xff\xff\xffeXIf",  # a chunk claiming 4 GB
        bytes(range(256)) * 4,
    ],
    ids=["empty", "only SOI", "segment past the end", "IFD offset huge", "png chunk huge", "noise"],
)
def test_hostile_headers_read_as_upright_without_error(data):
    assert int(exif_orientations(tf.constant([data]))[0]) == 1


def _mean_difference(data: bytes, served: np.ndarray) -> float:
    trained = np.asarray(Image.open(io.BytesIO(process_image(data, SIZE).encoded)), np.float32)
    return float(np.abs(trained - served).mean())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_served_pixels_match_the_trained_pixels_in_every_orientation(fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_scene(), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    served = _served(data)
    assert _mean_difference(data, served) < SAME
    if orientation != 1:  # the test can tell: the image left as stored is far off
        sideways = orient(tf.constant(served), tf.constant(1)).numpy()
        stored = _served(_encode(_scene(), "PNG"))
        assert np.abs(sideways - stored).mean() > DIFFERENT
        assert _mean_difference(data, stored) > DIFFERENT


@pytest.mark.parametrize("width", [SIZE - 1, SIZE, SIZE * 2 - 1, SIZE * 2, SIZE * 4 + 3, SIZE * 8, SIZE * 20])
def test_large_jpegs_are_decoded_at_the_dct_scale_pillows_draft_picks(width):
    """Pillow's ``draft`` (the preprocessing stage) decodes a large JPEG at 1/2, 1/4 or 1/8
    scale; the graph must pick the same scale: the same decoded size, for either side the
    shorter. (Its speed is in the prediction benchmark.)"""
    from components.evaluate.decode import _decode_jpeg

    for size in [(width, SIZE * 3), (SIZE * 3, width)]:
        data = _encode(_scene(*size), "JPEG", quality=92)
        pillow = Image.open(io.BytesIO(data))
        pillow.draft("RGB", (SIZE, SIZE))
        decoded = _decode_jpeg(tf.constant(data), SIZE).shape
        assert (decoded[1], decoded[0]) == pillow.size


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_a_large_jpeg_serves_the_trained_pixels(mode):
    data = _encode(_scene(SIZE * 9, SIZE * 7).convert(mode), "JPEG", quality=92)
    assert _mean_difference(data, _served(data)) < SAME


def _half_transparent(mode: str) -> bytes:
    image = _scene().convert("RGBA")
    alpha = np.zeros((60, 90), np.uint8)
    alpha[:, 30:60], alpha[:, 60:] = 128, 255  # clear, half, opaque thirds
    image.putalpha(Image.fromarray(alpha))
    return _encode(image.convert(mode), "PNG")


def _two_color_palette(fmt: str, colors: list[int], transparent: int) -> bytes:
    """A palette image, left half color 0 and right half color 1, one of them see-through."""
    indices = np.zeros((60, 90), np.uint8)
    indices[:, 45:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette(colors + [0] * (768 - len(colors)))
    return _encode(image, fmt, transparency=transparent)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _half_transparent("RGBA"),
        lambda: _half_transparent("LA"),
        lambda: _two_color_palette("PNG", [20, 20, 20, 200, 40, 40], 0),  # the dark left half
        lambda: _encode(_scene().convert("RGBA"), "BMP"),  # 32-bit BI_RGB: the 4th byte is not alpha
        lambda: _encode(_scene().convert("L"), "JPEG", quality=95),
        lambda: _encode(Image.fromarray(np.asarray(_scene().convert("L"), np.uint16) * 257), "PNG"),
        lambda: _encode(_scene().convert("CMYK"), "JPEG", quality=95),
    ],
    ids=["rgba", "gray+alpha", "palette tRNS", "bmp 32-bit", "gray", "gray 16-bit", "cmyk"],
)
def test_served_pixels_match_the_trained_pixels_for_every_color_mode(build):
    data = build()
    served = _served(data)
    assert _mean_difference(data, served) < SAME


def test_transparency_is_composited_on_white_not_dropped():
    data = _half_transparent("RGBA")
    served = _served(data, 90)
    assert served[:, :25].min() > 250  # the clear third is white
    dropped = tf.io.decode_png(data, channels=3).numpy()  # what channels=3 would have served
    assert dropped[:, :25].mean() < 200


def _png_with_xmp_orientation() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    xmp = '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    info.add_itxt("XML:com.adobe.xmp", xmp)
    return _encode(_scene(), "PNG", pnginfo=info)


def test_the_documented_differences_still_hold():
    """decode.py's docstring names what the graph does not do as Pillow does; if TensorFlow
    or Pillow changes, this fails and the docstring and docs/stages.md need a look."""
    gif = _two_color_palette("GIF", [20, 200, 20, 200, 40, 40], 1)  # the red right half is see-through
    trained, served = np.asarray(Image.open(io.BytesIO(process_image(gif, SIZE).encoded))), _served(gif)
    assert trained[:, -10:].min() > 240  # white where see-through
    assert served[:, -10:].max() < 10  # black
    xmp = _png_with_xmp_orientation()
    assert _pillow_orientation(xmp) == 6
    assert int(exif_orientations(tf.constant([xmp]))[0]) == 1


def test_the_exported_model_sees_a_sideways_stored_photo_upright(tmp_path):
    """Through the SavedModel's ``serving_default``: a 4-class "where is the red" model must
    answer "top" for a JPEG stored with red on the left and EXIF orientation 6."""
    import tf_keras

    def where_is_red(pixels):
        red = pixels[..., 0] - pixels[..., 2]  # red minus blue, per pixel
        half = pixels.shape[1] // 2
        means = [
            tf.reduce_mean(red[:, :half], [1, 2]),
            tf.reduce_mean(red[:, half:], [1, 2]),
            tf.reduce_mean(red[:, :, :half], [1, 2]),
            tf.reduce_mean(red[:, :, half:], [1, 2]),
        ]
        return tf.nn.softmax(tf.stack(means, axis=1) / 10.0)

    inputs = tf_keras.Input((SIZE, SIZE, 3))
    model = tf_keras.Model(inputs, tf_keras.layers.Lambda(where_is_red)(inputs))
    classes = ["top", "bottom", "left", "right"]
    upright = Image.open(io.BytesIO(rotated_jpeg())).rotate(-90, expand=True)  # red on top
    with export.staged(model, classes, SIZE, 1) as local:
        serve = tf.saved_model.load(local).signatures[export.SERVING_DEFAULT]
        as_stored = Image.open(io.BytesIO(rotated_jpeg()))  # the same pixels, no EXIF
        files = [rotated_jpeg(), _encode(upright, "PNG"), _encode(as_stored, "PNG")]
        names = serve(images=tf.constant(files))["class_names"].numpy()[:, 0]
    assert [n.decode() for n in names] == ["top", "top", "left"]  # the last has no EXIF: as stored
