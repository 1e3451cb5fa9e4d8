"""Load the one training image and normalise it to 8-bit RGB at a fixed resolution.

Every problem a user can cause (bad path, not an image, truncated, huge, empty) becomes an
`InputError` that names the file, says what is wrong and what to do about it.
"""

from __future__ import annotations

import io
import operator
import os
import struct
import warnings
import zlib
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from unziplora.errors import InputError

# Decompression-bomb guard: a tiny file can declare billions of pixels. Callers who really
# want bigger images pass max_pixels=...; Pillow's global MAX_IMAGE_PIXELS is never touched.
MAX_PIXELS = 100_000_000

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

# What Pillow raises for damaged data varies by format; all of them mean "corrupt file".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error)


def load_image(source: ImageSource, resolution: int, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `source` (a path, bytes, or a binary file object) and return an 8-bit RGB image
    whose shorter side is exactly `resolution` (aspect ratio kept, longer side rounded to the
    nearest pixel).

    EXIF orientation is applied; transparency is composited onto white; grayscale, palette,
    CMYK, 16-bit and float images are converted to 8-bit RGB (see `_to_rgb`). Downscaling uses
    LANCZOS (sharpest alias-free filter); upscaling uses BICUBIC, because Lanczos' negative lobes
    add visible ringing around edges when enlarging. Upscaling also emits a UserWarning.
    Raises InputError for anything wrong with the input.
    """
    resolution = _positive_int(resolution, "resolution")
    max_pixels = _positive_int(max_pixels, "max_pixels")
    name = _describe(source)

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes) or not path:
            raise InputError(f"invalid image path {source!r}; pass the path of one image file as a string")
        if not os.path.exists(path):
            raise InputError(f"{name}: file not found (looked in {os.path.abspath(path)!r}); check the path")
        if os.path.isdir(path):
            raise InputError(f"{name} is a directory, not an image; pass the path of one image file inside it")
        if os.path.getsize(path) == 0:
            raise InputError(f"{name} is empty (0 bytes); re-export or re-download the image")
        try:
            fh = open(path, "rb")
        except PermissionError:
            raise InputError(f"{name} cannot be read: permission denied; fix its permissions (chmod +r) "
                             "or copy it somewhere readable") from None
        except OSError as e:
            raise InputError(f"{name} cannot be read: {e.strerror or e}; check the file and try again") from e
        with fh:
            image = _decode(fh, name, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError(f"{name} are empty (0 bytes); pass the full contents of an image file")
        image = _decode(io.BytesIO(source), name, max_pixels)
    elif isinstance(source, io.TextIOBase):
        raise InputError(f"{name} was opened in text mode; open the image with open(path, 'rb')")
    elif hasattr(source, "read"):
        image = _decode(source, name, max_pixels)
    else:
        raise InputError(f"cannot load an image from a {type(source).__name__}; "
                         "pass a path, bytes, or a binary file object")

    return _resize_shorter_side(_to_rgb(image, name), resolution, name)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """Return `image` as a (1, 3, H, W) float32 tensor in [-1, 1] (the range SDXL's VAE expects).

    Images that are not RGB yet are normalised exactly as `load_image` would (no resizing).
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"image_to_tensor needs a PIL image, got {type(image).__name__}; use load_image first")
    if image.width == 0 or image.height == 0:
        raise InputError(f"the image has zero size ({image.width}x{image.height}); it contains no picture")
    array = np.array(_to_rgb(image, "the image"), dtype=np.uint8)  # a copy: torch wants writable memory
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    return (tensor / 127.5 - 1.0).contiguous()


def _positive_int(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InputError(f"{what} must be a positive integer, got {value!r}") from None
    if number <= 0:
        raise InputError(f"{what} must be a positive integer, got {number}")
    return number


def _describe(source) -> str:
    """A short name for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image bytes"
    file_name = getattr(source, "name", None)
    return f"image file object {file_name!r}" if isinstance(file_name, str) else "image file object"


def _decode(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open, size-check and fully decode; the result no longer depends on `fp`."""
    # Pillow only *warns* above its MAX_IMAGE_PIXELS (hard error above twice that). Treat the
    # warning as an error unless the caller's max_pixels deliberately allows such sizes.
    # The filter is local to this block; global warning filters and Pillow settings stay as they were.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    bomb_action = "ignore" if pillow_limit is not None and max_pixels > pillow_limit else "error"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(bomb_action, Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                width, height = im.size  # from the header: nothing decoded yet
                if width == 0 or height == 0:
                    raise InputError(f"{name} has zero size ({width}x{height} pixels) so it holds no picture; "
                                     "re-export it or pick another image")
                if width * height > max_pixels:
                    raise InputError(f"{name} is {width}x{height} = {width * height:,} pixels, more than the "
                                     f"limit of {max_pixels:,} (a guard against decompression bombs); downscale "
                                     "it first, or pass a larger max_pixels if you trust the file")
                im.load()  # decode everything now, so truncated/corrupt data fails here, not later
                return ImageOps.exif_transpose(im)  # always a new, fully loaded image
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} is too large to open safely ({e}); downscale it first") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{name} is not an image Pillow can read (unknown format or damaged header); "
                         "use a PNG, JPEG or WebP file") from e
    except _DECODE_ERRORS as e:
        raise InputError(f"{name} could not be decoded, it looks truncated or corrupt ({e}); "
                         "re-export or re-download the image") from e


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    - 16-bit ("I;16*") and 32-bit int ("I") data are taken as 0..65535 (Pillow also stores
      16-bit PNG/TIFF as "I") and scaled to 0..255, rather than clipped as Pillow's convert does.
    - Float ("F") data: taken as 0..1 if its largest value is <= 1, else as 0..255 and clipped;
      NaN/inf become 0.
    - Anything with transparency is composited onto white: transparent areas are usually meant
      as blank paper, and black would darken the edges of a cut-out subject.
    - CMYK uses Pillow's conversion (an embedded ICC profile is not applied).
    """
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # round to nearest
    elif mode == "F":
        values = np.asarray(im).astype(np.float64)
        values = np.where(np.isfinite(values), values, 0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        im = Image.fromarray(np.rint(values.clip(0.0, 255.0)).astype(np.uint8))

    if im.mode == "RGB":
        return im
    try:
        if im.has_transparency_data:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:
        raise InputError(f"{name} uses colour mode {mode!r}, which cannot be converted to RGB ({e}); "
                         "save it as an ordinary RGB PNG or JPEG") from e


def _resize_shorter_side(im: Image.Image, resolution: int, name: str) -> Image.Image:
    width, height = im.size
    short, long = min(width, height), max(width, height)
    if short == resolution:
        return im
    # Integer maths rounds half up exactly (round() would round half to even); >= resolution since long >= short.
    new_long = (2 * long * resolution + short) // (2 * short)
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    if short < resolution:
        warnings.warn(f"{name} is only {width}x{height} pixels; upscaling it to {size[0]}x{size[1]} "
                      f"(shorter side {resolution}) will look soft. Use an image at least {resolution} "
                      "pixels on its shorter side for best results.", UserWarning, stacklevel=3)
        return im.resize(size, Image.Resampling.BICUBIC)
    return im.resize(size, Image.Resampling.LANCZOS)
