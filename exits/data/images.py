"""Image decoding that normalises every input to (H, W, 3) uint8 RGB or raises a clear error.

Rules every stage follows (labelling, training crops, report, and stage 2 via
``exits.stage2.configs``):

* **Paths**: a ``file_name`` must resolve inside the images root: relative, no ``..`` that
  leaves the root, no URI scheme, no symlink out of a local root. A name that escapes the root
  and a missing file give the *same* reason (:data:`NOT_FOUND`), so nothing about files
  outside the root leaks.
* **Size before decode**: the header's size is read first (PIL ``Image.open`` reads no
  pixels); more than ``max_pixels`` pixels or a size other than the annotation's is an error
  before any pixel buffer is allocated (decompression bombs never decode).
* **EXIF orientation is ignored** (the COCO / pycocotools / PIL convention: the stored pixel
  grid); when the declared size is the transpose of the stored one the reason says that the
  annotation probably follows the EXIF-rotated image.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import warnings
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from exits import storage

NOT_FOUND = "missing image file"  # also for names outside the images root: reveals nothing
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is written to error rows."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def relative_name(file_name: object) -> str | None:
    """``file_name`` normalised to a plain relative path (``a/./b`` -> ``a/b``), or None for
    anything else: not a string, empty, absolute, a URI, a drive letter, ``..`` leaving the
    top, NUL. A string-only check (no filesystem access)."""
    name = file_name if isinstance(file_name, str) else ""
    norm = posixpath.normpath(name.replace("\\", "/")) if name else ""
    if (
        norm in ("", ".", "..")
        or "\x00" in name
        or "://" in name
        or norm.startswith(("/", "../"))
        or (len(norm) > 1 and norm[1] == ":")  # a Windows drive letter
    ):
        return None
    return norm


def image_uri(root: str, file_name: str) -> str:
    """URI of ``file_name`` under the images root ``root``; raises :class:`ImageError`
    (reason :data:`NOT_FOUND`) for a name that is not a plain relative path inside it."""
    norm = relative_name(file_name)
    if norm is None:
        raise ImageError(f"{NOT_FOUND}: {file_name!r}")
    uri = storage.join(root, norm)
    if not storage.is_s3(root) and "://" not in root:  # local: no symlink out of the root
        real_root = os.path.realpath(root)
        if not os.path.realpath(uri).startswith(real_root.rstrip(os.sep) + os.sep):
            raise ImageError(f"{NOT_FOUND}: {file_name!r}")
    return uri


def image_header_size(data: bytes | BinaryIO) -> tuple[int, int, int]:
    """(height, width, EXIF orientation) from the header (bytes or an open binary file),
    without decoding pixels."""
    with _decode_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            w, h = im.size
            try:
                orientation = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1))
            except Exception:  # noqa: BLE001 - a broken EXIF block is not an image error
                orientation = 1
            return int(h), int(w), orientation


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Turn PIL's failures into :class:`ImageError`: a decompression bomb, an unrecognised
    format, or corrupt/truncated data."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError("corrupt image: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image: {e}") from e


def check_size(
    header: tuple[int, int, int],
    expected: tuple[int, int] | None = None,
    max_pixels: int | None = None,
) -> None:
    """Raise :class:`ImageError` when a header's size exceeds ``max_pixels`` or differs from
    the annotation's ``expected`` (height, width)."""
    h, w, orientation = header
    if max_pixels is not None and h * w > max_pixels:
        raise ImageError(f"image too large: {w}x{h} exceeds the limit of {max_pixels} pixels")
    if expected is not None and (h, w) != tuple(expected):
        eh, ew = expected
        reason = f"image size {w}x{h} differs from annotation {ew}x{eh}"
        if (w, h) == (eh, ew):
            reason += (
                " (a transpose: the annotation probably follows the EXIF-rotated image"
                + (f", EXIF orientation {orientation}" if orientation != 1 else "")
                + "; every stage uses the stored pixel grid and ignores EXIF orientation)"
            )
        raise ImageError(reason)


def decode_image(
    data: bytes, expected: tuple[int, int] | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8 RGB in the stored orientation (EXIF ignored).

    The header is checked first (:func:`check_size`: ``max_pixels``, ``expected`` (H, W));
    grayscale, palette, RGBA/LA (alpha dropped) and 16-bit images are normalised; a corrupt or
    truncated file or a decompression bomb raises :class:`ImageError`.
    """
    check_size(image_header_size(data), expected, max_pixels)
    with _decode_errors():
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


def read_image_bytes(uri: str, name: str | None = None) -> bytes:
    """The bytes at ``uri``; a missing file raises :class:`ImageError` (:data:`NOT_FOUND`,
    naming ``name``, default the URI)."""
    with _read_errors(uri if name is None else name):
        return storage.read_bytes(uri)


@contextlib.contextmanager
def _read_errors(name: str) -> Iterator[None]:
    """Turn a failed read into :class:`ImageError`: a missing file (local or s3) is
    :data:`NOT_FOUND` naming ``name``; any other failure names only the error's type."""
    try:
        yield
    except FileNotFoundError as e:
        raise ImageError(f"{NOT_FOUND}: {name}") from e
    except OSError as e:
        text = str(e).lower()
        if "not found" in text or "does not exist" in text or "is a directory" in text:
            raise ImageError(f"{NOT_FOUND}: {name}") from e
        raise ImageError(f"cannot read image {name}: {type(e).__name__}") from e


def load_image(
    uri: str,
    expected: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Read and decode an image from a local path or s3 URI; raises :class:`ImageError`."""
    return decode_image(read_image_bytes(uri, name), expected, max_pixels)


def load_image_under(
    root: str,
    file_name: str,
    expected: tuple[int, int] | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """:func:`load_image` of ``file_name`` resolved inside the images root (:func:`image_uri`)."""
    return load_image(image_uri(root, file_name), expected, max_pixels, name=repr(file_name))


def read_image_size(
    uri: str,
    expected: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    name: str | None = None,
) -> tuple[int, int]:
    """(height, width) from the image header only (no pixel decode); raises :class:`ImageError`.

    Catches missing, unreadable, unrecognised, oversized (``max_pixels``) and wrongly sized
    (``expected`` (H, W)) files cheaply; pixel data errors (a truncated JPEG body) surface when
    the labeller decodes the image. A missing file's reason names ``name`` (default the URI).
    """
    with _read_errors(uri if name is None else name):
        fs, path = storage.get_filesystem(uri)
        with fs.open_input_file(path) as f:
            header = image_header_size(f)
    check_size(header, expected, max_pixels)
    return header[0], header[1]
