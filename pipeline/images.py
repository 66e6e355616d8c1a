"""One contract for image files, in training and in use: how a file becomes the uint8 (C, H, W) a model takes.

    channels = channels_of(first_image)                  # 1 (grayscale kinds) or 3 (everything else)
    pixels = read_pixels(path, channels, size=(28, 28))  # uint8 (C, H, W), or ImageError naming the file
    pixels = decode_pixels(png_bytes, channels, name="images[0]")   # the same from a file's bytes (HTTP requests)

Training's image folders (data/sources.py), `pipeline predict` (predict.py) and `pipeline serve` (payloads.py,
images sent as base64 bytes) all read images here, so an image
is turned into pixels the same way on both sides: every mode converted to grayscale or RGB as Pillow
converts it (palette through its colours, alpha dropped), 16-bit and 32-bit integer images scaled to 8 bits
(not clipped to white, as Pillow's own conversion does), resized only when asked (the training data was).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from pipeline.errors import BadInput

if TYPE_CHECKING:  # Pillow is imported where an image is read, not when this module is
    from PIL.Image import Image as PILImage

__all__ = ["ImageError", "channels_of", "decode_pixels", "open_image", "read_pixels", "to_pixels"]

GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16 or 32 bits per pixel: scaled, not clipped


class ImageError(BadInput):
    """A file that is not an image this contract can turn into pixels; the message names it."""


def channels_of(image: object) -> int:
    """1 for the grayscale kinds of image, 3 for the colour ones (palette, RGB, RGBA, CMYK, ...)."""
    return 1 if getattr(image, "mode", "") in GRAYSCALE_MODES else 3


def open_image(path: Path | IO[bytes], name: str | None = None) -> PILImage:
    """A file's image, loaded, or an ImageError naming the file (or `name`): not an image, damaged, or too large to load."""
    from PIL import Image, UnidentifiedImageError

    where = name or path
    try:
        with Image.open(path) as image:
            image.load()
            return image
    # Damaged files also surface as Pillow's parser errors: SyntaxError ("broken PNG file"), ValueError ("Truncated IHDR chunk").
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{where}: not an image that can be read ({type(err).__name__})") from None
    except Image.DecompressionBombError as err:  # a header claiming more pixels than Pillow will allocate
        raise ImageError(f"{where}: {err} Resize it to the model's input size first") from None


def read_pixels(path: Path, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A file as uint8 (channels, height, width); resized to `size` (height, width) when given."""
    return _pixels(open_image(path), str(path), channels, size)


def decode_pixels(data: bytes, channels: int, size: tuple[int, int] | None = None, name: str = "image") -> np.ndarray:
    """An image file's bytes (PNG, JPEG, ...: what an HTTP client sends) as read_pixels reads the file; errors name `name`."""
    return _pixels(open_image(io.BytesIO(data), name), name, channels, size)


def _pixels(image: PILImage, where: str, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    try:
        return to_pixels(image, channels, size)
    except ImageError as err:
        raise ImageError(f"{where}: {err}") from None


def to_pixels(image: PILImage, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """An open Pillow image as uint8 (channels, height, width), by the rules in this module's docstring."""
    from PIL import Image

    if image.mode == "F":  # 32-bit floats: no scale to read them by (0-1? 0-255? 0-65535?)
        raise ImageError("a 32-bit floating-point image; save it as 8- or 16-bit grayscale or RGB")
    if image.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(image).astype(np.int64)
        if image.mode.startswith("I;16") or wide.max(initial=0) > 255:  # 16-bit range: 65535 -> 255
            wide = (wide.clip(0, 65535) * 255 + 32767) // 65535
        image = Image.fromarray(wide.clip(0, 255).astype(np.uint8), "L")
    try:
        image = image.convert("L" if channels == 1 else "RGB")
    except ValueError as err:  # modes Pillow has no conversion for (La, LAB, ...), as TIFF files may hold
        raise ImageError(f"a {image.mode} image ({err}); save it as grayscale or RGB") from None
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
