"""Hostile inputs for the tests/hostile suite, generated at test time (nothing checked in).

:func:`write_hostile_dataset` writes a COCO json and an images root in which every
annotation but the good ones triggers one probe of issue 13, and returns the expected
outcome per annotation id (``None`` = a mask, else a substring of the error reason).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image

SIZE = 96  # the good images are SIZE x SIZE (vit_tiny_demo crops are 96 px)
GOOD_BOX = [20, 20, 40, 40]  # xywh: a box inside every good image


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A ~3 KB PNG whose header declares ``width x height`` RGB pixels (a decompression bomb:
    decoding it would need width * height * 3 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 << 20), 9)  # the start of a huge all-black image
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_jpeg(height: int, width: int, orientation: int = 6) -> bytes:
    """A JPEG stored as ``height x width`` whose EXIF orientation says "rotate" (6: 90° CW, so
    EXIF-aware tools such as detectron2 or mmcv's default loader see ``width x height``)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def good_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
    img[20:60, 20:60] = 200
    return img


def ann(ann_id, image_id, **kw) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": list(GOOD_BOX),
            "iscrowd": 0, "area": 1600.0, **kw}  # fmt: skip


def write_hostile_dataset(root: str, outside: str) -> tuple[str, str, dict]:
    """Write ``<root>/images`` and ``<root>/ann.json``; ``outside`` is a directory outside the
    images root holding a real image (``outside.png``) for the path-escape probes.

    Returns (annotations json path, images root, {ann_id: expected reason substring or None}).
    """
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    os.makedirs(outside, exist_ok=True)
    for k in range(4):
        with open(os.path.join(images, f"good{k}.png"), "wb") as f:
            f.write(png(good_image(k)))
    with open(os.path.join(outside, "outside.png"), "wb") as f:
        f.write(png(good_image(9)))
    with open(os.path.join(images, "bomb.png"), "wb") as f:
        f.write(bomb_png())
    with open(os.path.join(images, "small_bomb.png"), "wb") as f:  # declared as SIZE x SIZE
        f.write(bomb_png())
    os.symlink(os.path.join(outside, "outside.png"), os.path.join(images, "link.png"))
    rel_outside = os.path.relpath(os.path.join(outside, "outside.png"), images)
    img = lambda i, name, h=SIZE, w=SIZE: {"id": i, "file_name": name, "height": h, "width": w}  # noqa: E731
    imgs = [
        img(1, "good0.png"), img(2, "good1.png"), img(3, "good2.png"), img(4, "good3.png"),
        img(10, "bomb.png", 60000, 60000),        # 2: bomb declared at its header size
        img(11, "small_bomb.png"),                # 2: bomb declared small (header != json)
        img(12, "good0.png", 60000, 60000),       # 3: ordinary image declared 60000 x 60000
        img(13, "good1.png"), img(13, "good2.png"),  # 7: one id, two files
        img(14, "/etc/hostname"),                 # 12: absolute path
        img(15, rel_outside),                     # 12: exists, outside the root
        img(16, "../nowhere/missing.png"),        # 12: does not exist, outside the root
        img(17, "link.png"),                      # 12: symlink out of the root
        img(18, "missing.png"),                   # 12: plainly missing
        {"id": 19, "file_name": "good3.png", "width": SIZE},  # 14: no height
        img("abc", "good3.png"), "not an object",  # ids / entries the export must survive
    ]  # fmt: skip
    nan = float("nan")
    anns = [
        ann(1, 1), ann(2, 2), ann(3, 3, extreme_points=[[40, 20], [20, 40], [40, 59], [59, 40]]),
        ann(4, 4, segmentation=[[20, 20, 60, 20, 60, 60, 20, 60]]),
        ann(20, 1, segmentation=[[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]]),   # 1: coordinates 1e9
        ann(21, 1, segmentation=[[0, 0, nan, 0, 50, 50]]),              # 1: NaN
        ann(22, 10), ann(23, 11), ann(24, 12), ann(25, 13),
        ann(26, 14), ann(27, 15), ann(28, 16), ann(29, 17), ann(30, 18), ann(31, 19),
        ann("7", 1), ann(7.5, 1), ann(2**70, 1), ann("abc", 1),        # 5 / 14: ids
        ann(40, 2, extreme_points=[[nan, 20], [20, 40], [40, 59], [59, 40]]),  # 14: NaN points
        ann(41, 2, segmentation=[[20, 20, 60, 20, 60, 60, 20]]),         # 14: odd polygon
        ann(42, 2, segmentation={"size": [SIZE, SIZE], "counts": "0000garbage"}),  # bad RLE
        ann(43, 2, category_id=99),
        ann(44, 2, segmentation=[[20, 20, 60, True, 60, 60, 20, 60]]),   # a boolean coordinate
    ]  # fmt: skip
    missing = "missing image file"
    expected = {
        1: None, 2: None, 3: None, 4: None,
        20: "outside the image", 21: "NaN", 22: "exceeds data.max_image_pixels",
        23: "image too large", 24: "exceeds data.max_image_pixels", 25: "duplicate image id 13",
        26: missing, 27: missing, 28: missing, 29: missing, 30: missing,
        31: "no valid height", 40: "NaN", 41: "odd number of coordinates", 42: "RLE",
        43: "unknown category id 99", 44: "must be a list of numbers",
    }  # fmt: skip
    data = {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = os.path.join(root, "ann.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, images, expected


# error rows whose ann_id is not a JSON integer: the reason names the id instead
BAD_ID_REASONS = (
    "'7' is a str",
    "7.5 is not an integer",
    "outside the int64 range",
    "'abc' is a str",
)


_HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from exits.lease import OutputLease
with OutputLease({out!r}, heartbeat_s=0.2):
    print("held", flush=True)
    time.sleep(600)
"""
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hold_in_subprocess(out: str) -> subprocess.Popen:
    """Another process on this host that holds the lease of ``out`` (as a running job does)
    until killed; returns once the lease is taken."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=REPO, out=out)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc
