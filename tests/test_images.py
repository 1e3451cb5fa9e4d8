"""Tests for unziplora.images, on small real files written by Pillow into tmp_path."""

import io
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from unziplora import images
from unziplora.errors import InputError
from unziplora.images import MAX_PIXELS, image_to_tensor, load_image


def save(tmp_path, image, filename, **kwargs):
    path = tmp_path / filename
    image.save(path, **kwargs)
    return path


def stored_mode(path):
    """The mode Pillow gives the file itself, to show the test exercises that mode."""
    with Image.open(path) as image:
        return image.mode


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixel(image, xy):
    return np.array(image.getpixel(xy), dtype=int)


def ppm_header_only(tmp_path, width, height):
    """A grayscale PPM that declares width x height but holds no pixel data."""
    path = tmp_path / "huge.pgm"
    path.write_bytes(f"P5\n{width} {height}\n255\n".encode())
    return path


@pytest.fixture
def no_warnings():
    """Fail the test if anything warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(InputError, match="not found") as info:
        load_image(path, 64)
    assert "nope.png" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory") as info:
        load_image(tmp_path, 64)
    assert str(tmp_path) in str(info.value)


def test_unreadable_file(tmp_path, monkeypatch):
    path = save(tmp_path, noise(8, 8), "secret.png")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root ignores file modes: simulate what open() would do
            def denied(*args, **kwargs):
                raise PermissionError(13, "Permission denied", str(path))

            monkeypatch.setattr(images, "open", denied, raising=False)
        with pytest.raises(InputError, match="permission denied") as info:
            load_image(path, 8)
        assert "secret.png" in str(info.value)
    finally:
        path.chmod(0o644)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)") as info:
        load_image(path, 64)
    assert "empty.png" in str(info.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n" * 10)
    with pytest.raises(InputError, match="not an image") as info:
        load_image(path, 64)
    assert "notes.png" in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    flag_before = ImageFile.LOAD_TRUNCATED_IMAGES
    path = save(tmp_path, noise(64, 64), f"cut.{fmt.lower()}", format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        load_image(path, 64)
    assert f"cut.{fmt.lower()}" in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES == flag_before


def test_corrupt_png_data(tmp_path):
    path = save(tmp_path, noise(64, 64), "bad.png")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = bytes(200)  # damage compressed pixel data (and its CRC check)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        load_image(path, 64)
    assert "bad.png" in str(info.value)


# ---------------------------------------------------------------- size guards


def test_too_many_pixels_checked_from_header_before_decoding(tmp_path):
    path = ppm_header_only(tmp_path, 9000, 9000)  # 81M pixels declared, no data at all
    with pytest.raises(InputError, match="more than the limit of 1,000,000") as info:
        load_image(path, 64, max_pixels=1_000_000)
    assert "huge.pgm" in str(info.value) and "9000x9000" in str(info.value)
    # Under the default limit the same file gets as far as decoding, which proves the
    # size refusal above came from the header alone.
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(path, 64)


def test_default_limit_refuses_above_max_pixels(tmp_path):
    width = MAX_PIXELS // 10_000 + 1
    path = ppm_header_only(tmp_path, width, 10_000)
    with pytest.raises(InputError, match="decompression bombs"):
        load_image(path, 64)


def test_pillow_decompression_bomb_error_becomes_input_error(tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    path = ppm_header_only(tmp_path, 30_000, 30_000)  # beyond Pillow's hard limit
    with pytest.raises(InputError, match="too large to open safely") as info:
        load_image(path, 64, max_pixels=10**12)  # even when our own limit allows it
    assert "huge.pgm" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_pillow_decompression_bomb_warning_becomes_input_error(tmp_path):
    path = ppm_header_only(tmp_path, 10_000, 9_500)  # 95M: Pillow warns, does not raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="too large to open safely") as info:
            load_image(path, 64, max_pixels=50_000_000)
    assert "huge.pgm" in str(info.value)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_larger_max_pixels_overrides_pillow_warning(tmp_path):
    path = ppm_header_only(tmp_path, 10_000, 9_500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="truncated or corrupt"):  # got past every size check
            load_image(path, 64, max_pixels=200_000_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_zero_size_image(tmp_path):
    # A placeable Windows metafile with an empty bounding box: Pillow opens it as 0x0.
    header = b"\xd7\xcd\xc6\x9a\x00\x00" + struct.pack("<4hH", 0, 0, 0, 0, 1440) + bytes(6)
    path = tmp_path / "empty.wmf"
    path.write_bytes(header + b"\x01\x00\x09\x00" + bytes(18))
    with pytest.raises(InputError, match=r"zero size \(0x0 pixels\)") as info:
        load_image(path, 64)
    assert "empty.wmf" in str(info.value)


# ---------------------------------------------------------------- normalisation


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (60, 30), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 10))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = save(tmp_path, stored, "phone.jpg", exif=exif, quality=95)

    image = load_image(path, 30)
    assert image.size == (30, 60)
    # Rotated clockwise, the block is now 10 wide x 20 tall in the top-right corner.
    assert np.abs(pixel(image, (25, 10)) - (255, 0, 0)).max() < 40
    assert np.abs(pixel(image, (5, 10)) - (0, 0, 255)).max() < 40
    assert np.abs(pixel(image, (25, 45)) - (0, 0, 255)).max() < 40


@pytest.mark.parametrize("mode, colour", [("L", 77), ("LA", (77, 255))])
def test_grayscale_becomes_rgb(tmp_path, mode, colour):
    path = save(tmp_path, Image.new(mode, (16, 16), colour), f"gray_{mode}.png")
    image = load_image(path, 16)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert tuple(pixel(image, (3, 3))) == (77, 77, 77)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_becomes_rgb(tmp_path, transparent):
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([10, 200, 30, 250, 0, 0] + [0] * (254 * 3))
    palette_image.paste(1, (0, 0, 8, 16))  # left half uses palette entry 1
    extra = {"transparency": 1} if transparent else {}
    path = save(tmp_path, palette_image, "palette.png", **extra)
    assert stored_mode(path) == "P"

    image = load_image(path, 16)
    assert image.mode == "RGB"
    assert tuple(pixel(image, (12, 5))) == (10, 200, 30)
    assert tuple(pixel(image, (3, 5))) == ((255, 255, 255) if transparent else (250, 0, 0))


def test_rgba_transparency_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((200, 10, 10, 255), (0, 0, 8, 8))  # opaque red
    rgba.paste((0, 0, 0, 128), (8, 8, 16, 16))  # half-transparent black
    image = load_image(save(tmp_path, rgba, "cutout.png"), 16)
    assert image.mode == "RGB"
    assert tuple(pixel(image, (12, 2))) == (255, 255, 255)
    assert tuple(pixel(image, (2, 2))) == (200, 10, 10)
    assert np.abs(pixel(image, (12, 12)) - 127).max() <= 2


def test_la_transparency_composited_on_white(tmp_path):
    la = Image.new("LA", (16, 16), (0, 0))
    la.paste((30, 255), (0, 0, 8, 16))
    image = load_image(save(tmp_path, la, "gray_alpha.png"), 16)
    assert tuple(pixel(image, (12, 4))) == (255, 255, 255)
    assert tuple(pixel(image, (4, 4))) == (30, 30, 30)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = save(tmp_path, Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "cyan.jpg", quality=95)
    assert stored_mode(path) == "CMYK"
    image = load_image(path, 16)
    assert image.mode == "RGB"
    assert np.abs(pixel(image, (8, 8)) - (0, 255, 255)).max() <= 8


def sixteen_bit_values():
    return np.array([[0, 32768], [65535, 1000]])


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = save(tmp_path, Image.fromarray(sixteen_bit_values().astype(np.uint16)), "deep.png")
    assert stored_mode(path) == "I;16"
    image = load_image(path, 2)
    assert np.array(image)[..., 0].tolist() == [[0, 128], [255, 4]]
    assert np.array_equal(np.array(image)[..., 0], np.array(image)[..., 2])


def test_mode_i_is_scaled_as_16bit(tmp_path):
    path = save(tmp_path, Image.fromarray(sixteen_bit_values().astype(np.int32)), "deep.tif")
    assert stored_mode(path) == "I"
    image = load_image(path, 2)
    assert np.array(image)[..., 1].tolist() == [[0, 128], [255, 4]]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[0.0, 0.5], [1.0, 0.25]], [[0, 128], [255, 64]]),  # max <= 1: taken as 0..1
        ([[-5.0, 100.0], [300.0, 255.0]], [[0, 100], [255, 255]]),  # else 0..255, clipped
    ],
)
def test_float_image_scaling(tmp_path, values, expected):
    path = save(tmp_path, Image.fromarray(np.array(values, dtype=np.float32)), "float.tif")
    assert stored_mode(path) == "F"
    assert np.array(load_image(path, 2))[..., 0].tolist() == expected


# ---------------------------------------------------------------- resizing


def test_small_image_is_upscaled_with_warning(tmp_path):
    path = save(tmp_path, noise(20, 10), "tiny.png")
    with pytest.warns(UserWarning, match="20x10") as caught:
        image = load_image(path, 32)
    assert image.size == (64, 32)
    assert "tiny.png" in str(caught[0].message)


def test_large_image_is_downscaled_silently(tmp_path, no_warnings):
    image = load_image(save(tmp_path, noise(200, 100), "big.png"), 50)
    assert image.size == (100, 50) and image.mode == "RGB"


def test_exact_size_is_unchanged(tmp_path, no_warnings):
    original = noise(48, 32)
    image = load_image(save(tmp_path, original, "exact.png"), 32)
    assert np.array_equal(np.array(image), np.array(original))


@pytest.mark.parametrize(
    "size, resolution, expected",
    [
        ((301, 200), 100, (151, 100)),  # 150.5 rounds up
        ((299, 200), 100, (150, 100)),  # 149.5 rounds up
        ((200, 333), 100, (100, 167)),  # portrait: 166.5 -> 167
        ((200, 331), 100, (100, 166)),  # 165.5 -> 166
        ((120, 120), 100, (100, 100)),
    ],
)
def test_shorter_side_matches_and_longer_side_rounds(tmp_path, size, resolution, expected):
    assert load_image(save(tmp_path, noise(*size), "r.png"), resolution).size == expected


# ---------------------------------------------------------------- sources and arguments


def test_all_source_kinds_agree(tmp_path):
    path = save(tmp_path, noise(40, 30), "same.png")
    reference = np.array(load_image(path, 30))
    for source in (str(path), path.read_bytes(), bytearray(path.read_bytes()), io.BytesIO(path.read_bytes())):
        assert np.array_equal(np.array(load_image(source, 30)), reference)
    with open(path, "rb") as fh:
        assert np.array_equal(np.array(load_image(fh, 30)), reference)
        assert not fh.closed  # the caller's file object is left for the caller to close


def test_bad_sources(tmp_path):
    path = save(tmp_path, noise(8, 8), "x.png")
    with open(path, encoding="latin-1") as text, pytest.raises(InputError, match="text mode"):
        load_image(text, 8)
    with pytest.raises(InputError, match="empty"):
        load_image(b"", 8)
    with pytest.raises(InputError, match="not an image") as info:
        load_image(b"definitely not a picture", 8)
    assert "image bytes" in str(info.value)
    with pytest.raises(InputError, match="cannot load an image from a int"):
        load_image(123, 8)


@pytest.mark.parametrize("resolution", [0, -1, "512", 51.2, True])
def test_bad_resolution(tmp_path, resolution):
    with pytest.raises(InputError, match="resolution must be a positive integer"):
        load_image(save(tmp_path, noise(8, 8), "x.png"), resolution)


# ---------------------------------------------------------------- tensors


def test_image_to_tensor():
    image = Image.new("RGB", (3, 2), (0, 255, 128))
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[0, 0].eq(-1.0).all() and tensor[0, 1].eq(1.0).all()
    assert torch.allclose(tensor[0, 2], torch.full((2, 3), 128 / 127.5 - 1), atol=1e-6)


def test_image_to_tensor_normalises_other_modes():
    tensor = image_to_tensor(Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert tensor.shape == (1, 3, 2, 2) and tensor.eq(1.0).all()  # transparent -> white
    with pytest.raises(InputError, match="PIL image"):
        image_to_tensor(np.zeros((2, 2, 3)))
