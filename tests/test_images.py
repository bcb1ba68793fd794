"""The pure image core on every valid odd input and every bad one."""

import io
import os
from contextlib import nullcontext

import numpy as np
import pytest
from PIL import Image

from components.preprocess.images import BadImage, process_image
from tests.image_fixtures import RED, make_odd_and_bad, rotated_jpeg


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("odd"))
    return root, make_odd_and_bad(root)


def _decode(encoded: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(encoded))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image)


def test_every_valid_odd_file_becomes_a_square_rgb_jpeg(fixtures):
    root, expected = fixtures
    valid = [rel for rel, reason in expected.items() if reason is None]
    assert len(valid) >= 10
    for rel in valid:
        with open(os.path.join(root, rel), "rb") as f:
            result = process_image(f.read(), size=64, min_size=32)
        assert _decode(result.encoded).shape == (64, 64, 3), rel


@pytest.mark.parametrize(
    "rel, reason",
    [
        ("beta/empty.jpg", "empty_file"),
        ("beta/truncated.jpg", "corrupt_image"),
        ("beta/garbage.png", "not_an_image"),
        ("beta/notes.jpg", "not_an_image"),
        ("beta/tiny.png", "too_small"),
        ("beta/scan.tiff", "unsupported_format"),
    ],
)
def test_bad_files_raise_their_reason(fixtures, rel, reason):
    root, expected = fixtures
    assert expected[rel] == reason
    with open(os.path.join(root, rel), "rb") as f:
        data = f.read()
    with pytest.raises(BadImage) as error:
        process_image(data, size=64, min_size=32)
    assert error.value.reason == reason
    assert error.value.detail


@pytest.mark.parametrize("side", [120, 150])  # Pillow warns below twice its limit, raises above
def test_images_over_pillows_pixel_limit_are_too_large(monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    out = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(out, format="PNG")
    # Pillow's own warning still shows below twice the limit; the image is rejected either way
    warns = pytest.warns(Image.DecompressionBombWarning) if side * side <= 2 * 100 * 100 else nullcontext()
    with warns, pytest.raises(BadImage) as error:
        process_image(out.getvalue(), size=64)
    assert error.value.reason == "too_large"
    assert "limit of" in error.value.detail and "pixels" in error.value.detail
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", side * side)  # at the limit: fine
    assert process_image(out.getvalue(), size=64).source_size == (side, side)


def test_exif_orientation_is_applied():
    pixels = _decode(process_image(rotated_jpeg(), size=64).encoded).astype(int)
    top, bottom = pixels[:16].mean(axis=(0, 1)), pixels[-16:].mean(axis=(0, 1))
    assert np.abs(top - RED).max() < 30, top  # red was on the left; rotated 90 CW it is on top
    assert bottom[2] > 150 and bottom[0] < 80, bottom


def test_transparency_is_composited_on_white_and_gif_uses_first_frame(fixtures):
    root, _ = fixtures
    with open(os.path.join(root, "alpha/transparent_rgba.png"), "rb") as f:
        assert _decode(process_image(f.read(), 32).encoded).min() > 245
    with open(os.path.join(root, "alpha/animated.gif"), "rb") as f:
        result = process_image(f.read(), 32)
    assert result.source_format == "GIF"
    assert result.pixel_mean[1] > 180 and result.pixel_mean[0] < 40  # green first frame


def test_statistics_match_the_resized_pixels():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (100, 120, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, "PNG")
    result = process_image(out.getvalue(), size=50)
    resized = np.asarray(image.resize((50, 50), Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.allclose(result.pixel_mean, resized.mean(axis=(0, 1)), atol=1e-3)
    assert np.allclose(result.pixel_sq_mean, (resized**2).mean(axis=(0, 1)), rtol=1e-5)
    assert result.source_size == (120, 100)
