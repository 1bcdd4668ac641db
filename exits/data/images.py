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
* **Files, not devices**: a name must be a regular file (``stat`` of the opened descriptor on
  local disk, opened without blocking, so a FIFO never hangs; the object's metadata on s3) and,
  where a file is read whole, at most ``max_bytes`` long (``data.max_image_bytes``), checked
  before a byte of it is read.
* **An allow-list of formats** (:data:`ALLOWED_FORMATS`: JPEG, PNG, WebP, BMP, TIFF, GIF (first
  frame)): Pillow never sniffs anything else, so no EPS/PS/PDF file ever reaches Ghostscript
  or any other external program, whatever its name.
* **Any failure is an error**: every exception from the header read or the decode becomes
  :class:`ImageError` naming the exception's type (a fuzzed file raises ``NotImplementedError``
  or ``TypeError`` inside Pillow, not only ``OSError``).
* **Faithful 8-bit RGB or an error**: 16-bit grayscale (``I;16*``) is scaled by 255/65535;
  float (``F``) and 32-bit integer (``I``) pixels have no faithful 8-bit mapping (a 0-1 float
  image would decode black, an int32 one white) and are errors.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import reprlib
import stat
import warnings
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from exits import storage

NOT_FOUND = "missing image file"  # also for names outside the images root: reveals nothing
# the only formats Pillow may open: none of them runs an external program
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # scaled by 255/65535
UNFAITHFUL_MODES = {"F": "float", "I": "32-bit integer"}  # no faithful 8-bit mapping
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
        with _open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            w, h = im.size
            try:
                orientation = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1))
            except Exception:  # noqa: BLE001 - a broken EXIF block is not an image error
                orientation = 1
            return int(h), int(w), orientation


def _open(fp: BinaryIO) -> Image.Image:
    """``Image.open`` restricted to :data:`ALLOWED_FORMATS` (no sniffing of other formats)."""
    return Image.open(fp, formats=ALLOWED_FORMATS)


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 120


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Turn every failure of Pillow into :class:`ImageError`: a decompression bomb, a format
    outside :data:`ALLOWED_FORMATS`, corrupt/truncated data, and any other exception a hostile
    file provokes inside a decoder (its type is named; the message is cut short)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # corrupt-EXIF / truncated-tag chatter per file
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(
            "corrupt image: not a recognised image format (allowed: "
            + ", ".join(ALLOWED_FORMATS)
            + ")"
        ) from e
    except Exception as e:  # noqa: BLE001 - hostile bytes: any decoder failure is an error row
        text = _short.repr(str(e)).strip("'\"")
        raise ImageError(f"corrupt image: {type(e).__name__}: {text}") from e


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
    grayscale, palette, RGBA/LA (alpha dropped) and 16-bit grayscale (x 255/65535) images are
    normalised; float and 32-bit integer images, a format outside :data:`ALLOWED_FORMATS`, a
    corrupt or truncated file, a decompression bomb and any other decoder failure raise
    :class:`ImageError`. GIF / APNG / WebP animations: the first frame.
    """
    check_size(image_header_size(data), expected, max_pixels)
    with _decode_errors():
        with _open(io.BytesIO(data)) as im:
            mode = im.mode
            if mode in UNFAITHFUL_MODES:
                raise ImageError(
                    f"unsupported pixel type: {UNFAITHFUL_MODES[mode]} pixels (mode {mode}) "
                    "have no faithful 8-bit RGB mapping"
                )
            im.load()  # full decode: truncated JPEG/PNG data raises here
            if im.mode in SIXTEEN_BIT_MODES:
                arr = np.asarray(im, dtype=np.float64)  # (H, W) in [0, 65535]
                arr = np.clip(arr * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if im.mode in UNFAITHFUL_MODES:
                raise ImageError(f"unsupported pixel type: mode {im.mode} after decoding")
            if im.mode != "RGB":
                im = im.convert("RGB")
            out = np.asarray(im, dtype=np.uint8)
            if out.ndim != 3 or out.shape[2] != 3:
                raise ImageError(f"corrupt image: decoded to shape {out.shape}")
            return out.copy()


@contextlib.contextmanager
def open_image_file(
    uri: str, name: str | None = None, max_bytes: int | None = None
) -> Iterator[tuple[BinaryIO, int]]:
    """Open the image file at ``uri`` for reading: ``(binary file, size in bytes)``.

    Checked before any byte is read: it is a regular file (local: ``fstat`` of a descriptor
    opened with ``O_NONBLOCK``, so a FIFO or device never blocks; s3: the object's metadata),
    and its size is at most ``max_bytes`` (None: no limit). Raises :class:`ImageError`; a
    missing file's reason is :data:`NOT_FOUND` naming ``name`` (default the URI).
    """
    label = uri if name is None else name
    with _read_errors(label):
        fs, path = storage.get_filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise ImageError(f"{NOT_FOUND}: {label}")
                raise ImageError(f"not an image file: {label} is not a regular file")
            f: Any = os.fdopen(fd, "rb")
            size = st.st_size
        else:  # s3: opening reads the object's metadata (one HEAD), no byte of its body
            f = fs.open_input_file(path)  # a prefix ("directory") or a missing key raises
            size = int(f.size())
        try:
            if max_bytes is not None and size > max_bytes:
                raise ImageError(
                    f"image file too large: {size} bytes exceeds data.max_image_bytes = {max_bytes}"
                )
            yield f, size
        finally:
            if f is not None:
                f.close()


def read_image_bytes(uri: str, name: str | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of the image file at ``uri`` (checked by :func:`open_image_file`: a regular
    file of at most ``max_bytes``); raises :class:`ImageError`."""
    with open_image_file(uri, name, max_bytes) as (f, size):
        with _read_errors(uri if name is None else name):
            data = f.read(size + 1)
    if max_bytes is not None and len(data) > max_bytes:  # grew since its size was read
        raise ImageError(f"image file too large: more than data.max_image_bytes = {max_bytes}")
    return data


@contextlib.contextmanager
def _read_errors(name: str) -> Iterator[None]:
    """Turn a failed read into :class:`ImageError`: a missing file (local or s3) is
    :data:`NOT_FOUND` naming ``name``; any other failure names only the error's type."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{NOT_FOUND}: {name}") from e
    except (IsADirectoryError, NotADirectoryError) as e:
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
    max_bytes: int | None = None,
) -> np.ndarray:
    """Read and decode an image from a local path or s3 URI; raises :class:`ImageError`.

    ``max_bytes``: files larger are refused before reading (``data.max_image_bytes``; None: no
    limit, for files prepare already checked)."""
    return decode_image(read_image_bytes(uri, name, max_bytes), expected, max_pixels)


def load_image_under(
    root: str,
    file_name: str,
    expected: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """:func:`load_image` of ``file_name`` resolved inside the images root (:func:`image_uri`)."""
    uri = image_uri(root, file_name)
    return load_image(uri, expected, max_pixels, name=repr(file_name), max_bytes=max_bytes)


def read_image_size(
    uri: str,
    expected: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    name: str | None = None,
    max_bytes: int | None = None,
) -> tuple[int, int]:
    """(height, width) from the image header only (no pixel decode); raises :class:`ImageError`.

    Catches missing, non-regular, unreadable, unrecognised, oversized (``max_pixels`` pixels,
    ``max_bytes`` bytes: ``data.max_image_bytes``, checked from the file's size before a byte
    is read; None: no limit) and wrongly sized (``expected`` (H, W)) files cheaply; pixel data
    errors (a truncated JPEG body) surface when the labeller decodes the image. A missing
    file's reason names ``name`` (default the URI).
    """
    with open_image_file(uri, name, max_bytes) as (f, _):
        with _read_errors(uri if name is None else name):
            header = image_header_size(f)
    check_size(header, expected, max_pixels)
    return header[0], header[1]
