"""A seeded mutation fuzzer for the image boundary (tests/hostile): small valid seeds of every
allowed format, generated at test time, and byte-level mutations of them (flips, overwrites
with boundary values, truncation, duplicated and deleted runs, inserted junk)."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

SEED_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP", "GIF", "BMP")
BOUNDARY_BYTES = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                  struct.pack(">I", 60000), struct.pack("<I", 60000), b"\xff\xff\xff\x7f")  # fmt: skip


def seed_images(size: int = 24) -> dict[str, bytes]:
    """{name: bytes}: one small image per allowed format (and a few modes), made now."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    rgb[4:16, 4:16] = (200, 40, 40)
    out = {}
    for fmt in SEED_FORMATS:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    for name, im, kw in (
        ("TIFF_deflate", Image.fromarray(rgb), {"format": "TIFF", "compression": "tiff_adobe_deflate"}),
        ("TIFF_16", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), {"format": "TIFF"}),
        ("PNG_palette", Image.fromarray(rgb).convert("P"), {"format": "PNG"}),
        ("PNG_gray16", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), {"format": "PNG"}),
        ("GIF_anim", Image.fromarray(rgb).convert("P"), {"format": "GIF", "save_all": True,
         "append_images": [Image.fromarray(255 - rgb).convert("P")]}),
    ):  # fmt: skip
        buf = io.BytesIO()
        im.save(buf, **kw)
        out[name] = buf.getvalue()
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random mutations of ``data``."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        n = len(b)
        if n < 2:
            b += bytes(rng.integers(0, 256, 8, dtype=np.uint8))
            continue
        op = int(rng.integers(0, 6))
        at = int(rng.integers(0, n))
        if op == 0:  # flip one bit
            b[at] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:  # overwrite with a boundary value (header fields: sizes, offsets, counts)
            v = BOUNDARY_BYTES[int(rng.integers(0, len(BOUNDARY_BYTES)))]
            b[at : at + len(v)] = v
        elif op == 2:  # truncate
            del b[max(1, at) :]
        elif op == 3:  # duplicate a run
            ln = int(rng.integers(1, 64))
            b[at:at] = b[at : at + ln]
        elif op == 4:  # delete a run
            del b[at : at + int(rng.integers(1, 64))]
        else:  # insert junk
            b[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8))
    return bytes(b)
