"""The serving graph's image decoding: the preprocessing stage's rules, as TensorFlow ops.

The model is trained on what :func:`components.preprocess.images.process_image` (Pillow) made
of each file, and served on what :func:`decode_images` makes of the same bytes inside the
SavedModel, where no Python runs (TF Serving, Beam's RunInference, a client's
``tf.saved_model.load``). So the graph applies the preprocessing stage's rules:

* **EXIF orientation** (tag 0x0112, as Pillow's ``ImageOps.exif_transpose``), read from a
  JPEG's first ``APP1 Exif`` segment or a PNG's ``eXIf`` chunk. A phone photo held upright
  is stored sideways with orientation 6; without this rule the server sees it sideways.
* **Transparency composited on white**, for PNGs with an alpha channel or a ``tRNS`` chunk
  (RGBA, gray + alpha, palette). ``channels=3`` would drop the alpha and keep whatever color
  the see-through pixels hold, often black. A 32-bit BMP's fourth byte is not alpha.
* **A large JPEG is decoded at a reduced DCT scale** (1/2, 1/4 or 1/8), the one Pillow's
  ``draft`` picks in preprocessing: the same pixels to resize from, and a fraction of the
  decoding work.
* Gray becomes RGB, 16-bit becomes 8-bit, a GIF's first frame is used, and the image is
  resized to the trained size with bilinear antialiasing (Pillow's ``BILINEAR`` resize).

The orientation is read with string ops that touch only the headers (a JPEG's segment
headers up to the image data, a PNG's chunk headers up to its first ``IDAT``), for the whole
batch at once. A header that is truncated or makes no sense reads as orientation 1
(upright). It follows Pillow's reading rules, down to the broken files Pillow still opens:
on thousands of randomly damaged headers the two agree on every file Pillow opens. What the
graph does not read, and Pillow does: an orientation found only in XMP metadata, in a PNG's
``eXIf`` chunk after the image data, stored as a fraction or a float, in EXIF split over
several JPEG segments, or past the first 128 entries of its IFD; and a GIF's transparent
color (TensorFlow's GIF decoder makes it black). ``tests/test_serving_decode.py`` pins both
the agreements and these differences.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

ORIENTATION_TAG = 0x0112
_JPEG_SOI = (0xFF, 0xD8)
_PNG_SIGNATURE = (0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A)
_EXIF_HEADER = tuple(b"Exif\0\0")
# Bounds on the header walk (a hostile file cannot make it long, nor the batch's tables
# large): camera and editor JPEGs hold fewer than 20 segments before the scan, PNGs a handful
# of chunks before IDAT, and a first IFD a few dozen entries.
_MAX_SEGMENTS = 256
_MAX_IFD_ENTRIES = 128
_WINDOW = 64  # bytes read at each step of a walk
# TIFF field types Pillow reads -> bytes a value; and those it gives as an integer (an
# orientation stored as a fraction or a float is not read here; Pillow would read 6.0 as 6).
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_INTEGER_TYPES = (3, 4, 6, 8, 9, 13, 16)


def _read(encoded: tf.Tensor, position: tf.Tensor, length: int) -> tf.Tensor:
    """``length`` bytes of each of ``encoded`` ([batch] strings) from its ``position``
    ([batch] int64), as int32 [batch, length]; zeros past the end."""
    size = tf.cast(tf.strings.length(encoded), tf.int64)
    start = tf.clip_by_value(position, 0, size)
    window = tf.strings.substr(encoded, start, tf.fill(tf.shape(start), tf.constant(length, tf.int64)))
    return tf.cast(tf.io.decode_raw(window, tf.uint8, fixed_length=length), tf.int32)


def _matches(values: tf.Tensor, expected: tuple[int, ...]) -> tf.Tensor:
    """Whether each row of ``values`` [batch, n] starts with ``expected``: [batch] bool."""
    return tf.reduce_all(tf.equal(values[:, : len(expected)], tf.constant(expected, tf.int32)), axis=1)


def _unsigned(values: tf.Tensor, little: tf.Tensor | bool = False) -> tf.Tensor:
    """The unsigned integers of each row's bytes (int64: a u32 does not fit int32),
    little-endian where ``little`` ([batch] bool) is true, else big-endian."""
    weights = tf.constant([256**i for i in range(values.shape[-1])], tf.int64)
    wide = tf.cast(values, tf.int64)
    as_little = tf.reduce_sum(wide * weights, axis=-1)
    as_big = tf.reduce_sum(wide * tf.reverse(weights, [0]), axis=-1)
    return tf.where(little, as_little, as_big)


def _walk(
    encoded: tf.Tensor, first: int, active: tf.Tensor, step: Callable[..., tuple[tf.Tensor, ...]]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Walks a file's segment headers from byte ``first`` while ``active``, all images of
    the batch at once (the loop runs as long as the longest walk, at most _MAX_SEGMENTS).

    ``step(position, head)`` gets each image's next _WINDOW bytes and returns
    ``(next position, go on, found, start, end)``; the walk of an image stops when it goes
    no further or finds the EXIF data's ``start`` and ``end``. Returns them, -1 where none.
    """
    size = tf.cast(tf.strings.length(encoded), tf.int64)
    none = tf.fill(tf.shape(encoded), tf.constant(-1, tf.int64))
    position = tf.fill(tf.shape(encoded), tf.constant(first, tf.int64))

    def body(position, active, start, end):
        after, go_on, found, found_start, found_end = step(position, _read(encoded, position, _WINDOW))
        start = tf.where(active & found, found_start, start)
        end = tf.where(active & found, found_end, end)
        active = active & go_on & tf.logical_not(found) & (after + 8 <= size)
        return tf.where(active, after, position), active, start, end

    _, _, start, end = tf.while_loop(
        lambda position, active, start, end: tf.reduce_any(active),
        body,
        (position, active & (position + 8 <= size), none, none),
        maximum_iterations=_MAX_SEGMENTS,
    )
    return start, end


def _jpeg_step(position: tf.Tensor, head: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """One step through a JPEG's markers, by the rules of Pillow's JPEG reader: the first
    ``APP1`` segment starting ``Exif\\0\\0`` holds the TIFF data. Bytes before a marker are
    skipped (to the next 0xFF), as are a doubled 0xFF and ``FF 00``; markers without a length
    (RSTn, SOI, EOI, JPGn) are stepped over; the walk ends at the start of scan or at a marker
    Pillow does not know (on which it refuses the file)."""
    first, marker, length = head[:, 0], head[:, 1], _unsigned(head[:, 2:4])
    at_marker = tf.equal(first, 0xFF)
    bare = (
        tf.equal(marker, 0xC8)
        | ((marker >= 0xD0) & (marker <= 0xD9))
        | ((marker >= 0xF0) & (marker <= 0xFD))
        | tf.equal(marker, 0x00)
    )
    segment = (marker >= 0xC0) & (marker <= 0xFE) & tf.logical_not(bare) & tf.not_equal(marker, 0xDA)
    is_ff = tf.equal(head, 0xFF)
    first_ff = tf.argmax(tf.cast(is_ff, tf.int32), axis=1)
    next_ff = tf.where(tf.reduce_any(is_ff, axis=1), first_ff, tf.constant(_WINDOW, tf.int64))
    after = tf.where(
        tf.logical_not(at_marker),
        position + next_ff,
        tf.where(
            tf.equal(marker, 0xFF),
            position + 1,
            tf.where(bare, position + 2, position + 4 + tf.maximum(length - 2, 0)),
        ),
    )
    go_on = tf.logical_not(at_marker) | tf.equal(marker, 0xFF) | bare | segment
    found = at_marker & tf.equal(marker, 0xE1) & (length >= 8) & _matches(head[:, 4:], _EXIF_HEADER)
    return after, go_on, found, position + 10, position + 2 + length


def _png_step(position: tf.Tensor, head: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """One PNG chunk, up to the first ``IDAT``: an ``eXIf`` chunk holds the TIFF data (a
    leading ``Exif\\0\\0`` in it is skipped, as Pillow does)."""
    length = _unsigned(head[:, :4])
    go_on = tf.logical_not(_matches(head[:, 4:8], tuple(b"IDAT")))
    found = go_on & _matches(head[:, 4:8], tuple(b"eXIf"))
    prefixed = _matches(head[:, 8:], _EXIF_HEADER)
    start = position + tf.where(prefixed, tf.constant(14, tf.int64), 8)
    return position + 12 + length, go_on, found, start, position + 8 + length


def _tiff_orientation(encoded: tf.Tensor, start: tf.Tensor, end: tf.Tensor) -> tf.Tensor:
    """The orientation tag of the TIFF structure in ``encoded[start:end]`` (its first IFD),
    read as Pillow reads it: entries of unknown types are skipped; an entry whose values lie
    outside the structure ends the reading; of several orientation entries the last wins,
    and its first value counts. 1 where there is none, it is not an integer, or not 1-8."""
    header = _read(encoded, start, 8)
    little = _matches(header, tuple(b"II*\0"))
    valid = (start >= 0) & (little | _matches(header, tuple(b"MM\0*")))
    ifd = _unsigned(header[:, 4:8], little)  # offsets are from the TIFF header
    length = end - start
    count = _unsigned(_read(encoded, start + ifd, 2), little)
    entries = tf.minimum(tf.minimum(count, tf.maximum((length - ifd - 2) // 12, 0)), _MAX_IFD_ENTRIES)
    table = tf.reshape(_read(encoded, start + ifd + 2, 12 * _MAX_IFD_ENTRIES), [-1, _MAX_IFD_ENTRIES, 12])
    per_entry = tf.tile(little[:, None], [1, _MAX_IFD_ENTRIES])
    tag, kind = _unsigned(table[..., 0:2], per_entry), _unsigned(table[..., 2:4], per_entry)
    values, field = _unsigned(table[..., 4:8], per_entry), _unsigned(table[..., 8:12], per_entry)
    sizes = tf.constant([_TYPE_SIZES.get(i, 0) for i in range(18)], tf.int64)
    size = values * tf.gather(sizes, tf.minimum(kind, 17))
    index = tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64)[None, :]
    # Pillow stops at the first entry whose values it cannot read from the structure.
    broken = (index < entries[:, None]) & (size > 4) & (field + size > length[:, None])
    stop = tf.reduce_min(tf.where(broken, index, tf.constant(_MAX_IFD_ENTRIES, tf.int64)), axis=1)
    read = (index < tf.minimum(entries, stop)[:, None]) & (size > 0)
    orientations = read & tf.equal(tag, ORIENTATION_TAG)
    last = tf.reduce_max(tf.where(orientations, index, tf.constant(-1, tf.int64)), axis=1)
    at = tf.maximum(last, 0)
    kind, size = tf.gather(kind, at, batch_dims=1), tf.gather(size, at, batch_dims=1)
    inline = tf.pad(tf.gather(table, at, batch_dims=1)[:, 8:12], [[0, 0], [0, 4]])
    outside = _read(encoded, start + tf.gather(field, at, batch_dims=1), 8)
    raw = tf.where((size > 4)[:, None], outside, inline)  # the first value's bytes, and more
    width = tf.gather(sizes, tf.minimum(kind, 17))
    first_value = tf.where(
        tf.equal(width, 1),
        tf.cast(raw[:, 0], tf.int64),
        tf.where(
            tf.equal(width, 2),
            _unsigned(raw[:, :2], little),
            tf.where(tf.equal(width, 4), _unsigned(raw[:, :4], little), _unsigned(raw, little)),
        ),
    )
    integer = tf.reduce_any(tf.equal(kind[:, None], tf.constant(_INTEGER_TYPES, tf.int64)), axis=1)
    usable = valid & (last >= 0) & integer & (first_value >= 1) & (first_value <= 8)
    return tf.cast(tf.where(usable, first_value, tf.constant(1, tf.int64)), tf.int32)


def exif_orientations(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8, int32) of each of a batch of encoded images ([batch]
    strings): 1 for formats other than JPEG and PNG, for images without one, and for metadata
    that cannot be read. The whole batch is parsed at once: per image, the many small ops of
    a header walk would cost more than decoding it."""
    encoded = tf.convert_to_tensor(encoded, tf.string)
    head = _read(encoded, tf.zeros(tf.shape(encoded), tf.int64), 8)
    jpeg_start, jpeg_end = _walk(encoded, 2, _matches(head, _JPEG_SOI), _jpeg_step)
    png_start, png_end = _walk(encoded, 8, _matches(head, _PNG_SIGNATURE), _png_step)
    jpeg = jpeg_start >= 0
    return _tiff_orientation(
        encoded, tf.where(jpeg, jpeg_start, png_start), tf.where(jpeg, jpeg_end, png_end)
    )


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns ``image`` (height x width x channels) upright for an EXIF orientation, the way
    Pillow's ``exif_transpose`` does (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate
    90 clockwise, 7 transverse, 8 rotate 90 counterclockwise).

    Each of the eight is a transpose (5-8) followed by a left-right mirror (2, 3, 6, 7) and an
    up-down flip (3, 4, 7, 8): one ``tf.transpose`` and one ``tf.reverse`` with computed
    arguments, no branches (an eight-way ``tf.switch_case`` here, inside the serving graph's
    ``map_fn``, cost a millisecond an image).
    """
    transposed = orientation >= 5
    mirrored = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))
    flipped = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))
    image = tf.transpose(image, tf.where(transposed, [1, 0, 2], [0, 1, 2]))
    return tf.reverse(image, tf.boolean_mask([0, 1], tf.stack([flipped, mirrored])))


def to_rgb(image: tf.Tensor, has_alpha: tf.Tensor) -> tf.Tensor:
    """Decoded uint8 pixels with 1-4 channels -> float32 RGB 0-255, as the preprocessing
    stage's ``_to_rgb``: transparency (the last channel of 2 or 4) is composited on white
    where ``has_alpha`` is true; a fourth channel is dropped where it is false."""
    pixels = tf.cast(image, tf.float32)
    channels = tf.shape(pixels)[-1]
    drop_fourth = tf.logical_not(has_alpha) & tf.equal(channels, 4)
    pixels = tf.cond(drop_fourth, lambda: pixels[..., :3], lambda: pixels)
    channels = tf.shape(pixels)[-1]

    def on_white() -> tf.Tensor:
        opacity = pixels[..., -1:] / 255.0
        return pixels[..., :-1] * opacity + 255.0 * (1.0 - opacity)

    color = tf.cond(tf.equal(channels % 2, 0), on_white, lambda: pixels)
    color = tf.cond(tf.equal(tf.shape(color)[-1], 1), lambda: tf.tile(color, [1, 1, 3]), lambda: color)
    return tf.ensure_shape(color, [None, None, 3])


def _decode_jpeg(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """A JPEG decoded at the DCT scale the preprocessing stage's Pillow ``draft`` picks: the
    largest of 1/8, 1/4, 1/2 that keeps both sides at least ``image_size``. libjpeg then skips
    most of the work for a large photo, and the pixels are those Pillow resized from."""
    shape = tf.io.extract_jpeg_shape(encoded)
    scale = tf.minimum(shape[0], shape[1]) // image_size
    branch = tf.where(scale >= 8, 0, tf.where(scale >= 4, 1, tf.where(scale >= 2, 2, 3)))
    decoders = [lambda r=ratio: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for ratio in (8, 4, 2, 1)]
    return tf.switch_case(branch, decoders)


def decode_image(encoded: tf.Tensor, orientation: tf.Tensor, image_size: int) -> tf.Tensor:
    """One encoded image and its EXIF orientation -> float32 RGB 0-255 at ``image_size``,
    upright (as the trainer reads it).

    Images already at the size are not resampled, so the preprocessing stage's own JPEGs
    (no metadata, no alpha) give exactly the trainer's pixels. The orientation is applied
    after resizing: to a square, resizing and the eight orientations commute, and the
    smaller image is cheaper to turn.
    """
    # A 32-bit BMP's fourth byte is unused in the common (BI_RGB) layout, and Pillow ignores
    # it; TensorFlow would return it as alpha, so a BMP's is dropped.
    bmp = tf.equal(tf.strings.substr(encoded, 0, 2), "BM")
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: _decode_jpeg(encoded, image_size),
        lambda: tf.io.decode_image(encoded, channels=0, expand_animations=False),
    )
    image = to_rgb(image, tf.logical_not(bmp))
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    same = tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size))
    image = tf.cond(
        same,
        lambda: image,
        lambda: tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True),
    )
    return tf.ensure_shape(orient(image, orientation), [image_size, image_size, 3])


def decode_images(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """A batch of encoded images ([batch] strings) -> float32 [batch, size, size, 3]: what
    the serving signatures feed the model."""
    orientations = exif_orientations(encoded)
    spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)
    return tf.map_fn(
        lambda pair: decode_image(pair[0], pair[1], image_size),
        (encoded, orientations),
        fn_output_signature=spec,
    )
