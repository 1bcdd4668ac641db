"""Image decoding that normalises every input to (H, W, 3) uint8 RGB or raises a clear error."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from exits import storage


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is written to error rows."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8 RGB.

    Grayscale, palette, RGBA/LA (alpha dropped) and 16-bit images are normalised; a corrupt or
    truncated file raises :class:`ImageError`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: truncated JPEG/PNG data raises here
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except UnidentifiedImageError as e:
        raise ImageError("corrupt image: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image: {e}") from e


def load_image(uri: str) -> np.ndarray:
    """Read and decode an image from a local path or s3 URI; raises :class:`ImageError`."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise ImageError(f"missing image file: {uri}") from e
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise ImageError(f"missing image file: {uri}") from e
        raise ImageError(f"cannot read image {uri}: {e}") from e
    return decode_image(data)


def read_image_size(uri: str) -> tuple[int, int]:
    """(height, width) from the image header only (no pixel decode); raises :class:`ImageError`.

    Catches missing, unreadable and unrecognised files cheaply; pixel data errors (a truncated
    JPEG body) surface when the labeller decodes the image.
    """
    try:
        fs, path = storage.get_filesystem(uri)
        with fs.open_input_file(path) as f, Image.open(f) as im:
            width, height = im.size
    except FileNotFoundError as e:
        raise ImageError(f"missing image file: {uri}") from e
    except UnidentifiedImageError as e:
        raise ImageError("corrupt image: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        text = str(e).lower()
        if "not found" in text or "does not exist" in text or "no such file" in text:
            raise ImageError(f"missing image file: {uri}") from e
        raise ImageError(f"corrupt image: {e}") from e
    return int(height), int(width)
