"""Issue 26 (round 2), the image boundary, without Ray: an allow-list of formats (nothing reaches
Ghostscript), regular files only (a FIFO never hangs), a byte limit checked before reading, any
decoder exception an ImageError, float / int32 pixels refused, and a seeded mutation fuzzer."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from image_fuzz import mutate, seed_images
from PIL import Image

from exits.config import DataConfig
from exits.data.images import (
    ALLOWED_FORMATS,
    ImageError,
    decode_image,
    load_image_under,
    read_image_size,
)
from exits.data.prepare import load_instances
from exits.label.stages import crop_images


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def in_thread(fn, timeout_s: float = 10.0):
    """fn() in a daemon thread; fails the test when it has not returned within ``timeout_s``."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"still running after {timeout_s} s (a hang)"
    return out


@pytest.mark.parametrize("fmt", ["EPS", "PDF", "IM", "DDS", "PPM", "TGA", "SGI"])
def test_formats_outside_the_allow_list_are_refused(monkeypatch, fmt):
    """Item 3 (round 2): an EPS named x.png went to Ghostscript; IM/DDS raised NotImplementedError
    inside Pillow. Only JPEG, PNG, WebP, BMP, TIFF, GIF are opened; no program ever starts."""

    def no_program(*a, **k):
        raise AssertionError(f"an external program was started: {a}")

    monkeypatch.setattr(subprocess, "Popen", no_program)
    data = encode(np.full((8, 8, 3), 90, np.uint8), fmt)
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(data)
    for m in (mutate(data, np.random.default_rng(k)) for k in range(20)):
        with pytest.raises(ImageError):
            decode_image(m)


def test_allowed_formats_decode_to_rgb():
    rgb = np.zeros((6, 10, 3), np.uint8)
    rgb[:, :5] = (255, 0, 0)
    for fmt in ("PNG", "BMP", "TIFF"):  # lossless: exact pixels back
        assert np.array_equal(decode_image(encode(rgb, fmt)), rgb), fmt
    for fmt in ("JPEG", "WEBP", "GIF"):
        out = decode_image(encode(rgb, fmt))
        assert out.shape == (6, 10, 3) and out.dtype == np.uint8 and out[0, 0, 0] > 200, fmt
    assert set(ALLOWED_FORMATS) == {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"}


def test_gif_and_apng_give_the_first_frame():
    a, b = np.full((4, 4, 3), 10, np.uint8), np.full((4, 4, 3), 240, np.uint8)
    for fmt in ("GIF", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, save_all=True, append_images=[Image.fromarray(b)])
        assert decode_image(buf.getvalue()).max() < 40, fmt


def test_float_and_int32_pixels_are_errors_16bit_is_scaled():
    """Item 6 (round 2): a float32 TIFF (0-1) decoded all black, an int32 one white; both got a
    mask. 16-bit grayscale maps faithfully: v -> round(v * 255 / 65535)."""
    with pytest.raises(ImageError, match=r"float pixels \(mode F\)"):
        decode_image(encode(np.full((8, 8), 0.5, np.float32), "TIFF"))
    with pytest.raises(ImageError, match=r"32-bit integer pixels \(mode I\)"):
        decode_image(encode(np.full((8, 8), 70000, np.int32), "TIFF"))
    sixteen = np.array([[0, 257, 32896, 65535]], np.uint16)
    for fmt in ("TIFF", "PNG"):
        out = decode_image(encode(sixteen, fmt))
        assert out[..., 0].tolist() == [[0, 1, 128, 255]] and (out[..., 0] == out[..., 2]).all()


def test_any_decoder_exception_is_an_image_error(monkeypatch):
    """Item 2 (round 2): only OSError/SyntaxError/ValueError were caught; a NotImplementedError
    or TypeError from inside Pillow killed the job. Any exception names its type."""
    data = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    for exc in (NotImplementedError("no decoder"), TypeError("bad tile"), KeyError("x")):

        def boom(self, exc=exc):
            raise exc

        monkeypatch.setattr(Image.Image, "load", boom)
        with pytest.raises(ImageError, match=f"corrupt image: {type(exc).__name__}"):
            decode_image(data)


def test_fifo_never_hangs(tmp_path):
    """Item 4 (round 2): a FIFO named like an image hung the job forever."""
    os.mkfifo(tmp_path / "pipe.png")
    for fn in (lambda: load_image_under(str(tmp_path), "pipe.png"),
               lambda: read_image_size(str(tmp_path / "pipe.png"), name="'pipe.png'")):  # fmt: skip
        out = in_thread(fn)
        assert isinstance(out.get("error"), ImageError), out
        assert "not a regular file" in out["error"].reason
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="^missing image file"):
        load_image_under(str(tmp_path), "dir.png")


def test_byte_limit_before_reading(tmp_path):
    """Item 5 (round 2): a 3 GiB sparse file starting with a valid 64x64 PNG was read whole
    (6.4 GB peak RSS, 217 s). The size is checked before a byte is read."""
    path = tmp_path / "sparse.png"
    path.write_bytes(encode(np.zeros((64, 64, 3), np.uint8), "PNG"))
    os.truncate(path, 3 << 30)  # sparse: no disk used
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    limit = DataConfig.max_image_bytes  # the default: 64 MiB
    with pytest.raises(ImageError, match=r"image file too large: 3221225472 bytes exceeds"):
        load_image_under(str(tmp_path), "sparse.png", expected=(64, 64), max_bytes=limit)
    # labelling (the stage that reads whole files of unchecked inputs) applies it by default
    rows = pa.table({"shard": [0], "image_id": [1], "file_name": ["sparse.png"], "height": [64],
                     "width": [64], "ann_id": [[7]], "category_id": [[1]],
                     "bbox": [[[2.0, 2.0, 20.0, 20.0]]], "extreme_points": [[None]],
                     "supervision": [["box"]]})  # fmt: skip
    crops = crop_images(rows, images=str(tmp_path), size=32, enlarge=1.3)
    assert crops["reason"].tolist() == [f"image file too large: 3221225472 bytes exceeds "
                                        f"data.max_image_bytes = {limit}"]  # fmt: skip
    assert time.time() - t < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB
    with pytest.raises(ImageError, match="exceeds data.max_image_bytes = 1000"):
        load_image_under(str(tmp_path), "sparse.png", max_bytes=1000)
    small = tmp_path / "small.png"
    small.write_bytes(encode(np.zeros((64, 64, 3), np.uint8), "PNG"))
    assert load_image_under(str(tmp_path), "small.png", max_bytes=small.stat().st_size).shape == (
        64, 64, 3)  # fmt: skip
    with pytest.raises(ImageError, match="too large"):
        load_image_under(str(tmp_path), "small.png", max_bytes=small.stat().st_size - 1)


def test_prepare_gives_error_rows_for_fifo_and_eps(tmp_path):
    """The header check at prepare: one error row each, the good image an instance."""
    good = encode(np.zeros((16, 16, 3), np.uint8), "PNG")
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "eps.png").write_bytes(encode(np.zeros((16, 16, 3), np.uint8), "EPS"))
    os.mkfifo(tmp_path / "fifo.png")
    names = ["good.png", "eps.png", "fifo.png"]
    coco = {"images": [{"id": i, "file_name": n, "height": 16, "width": 16}
                       for i, n in enumerate(names, 1)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8]}
                            for i in (1, 2, 3)],
            "categories": [{"id": 1}]}  # fmt: skip
    (tmp_path / "a.json").write_text(__import__("json").dumps(coco))
    out = in_thread(lambda: load_instances(str(tmp_path / "a.json"), str(tmp_path)))
    inst, err = out["value"]
    assert inst["ann_id"].to_pylist() == [1]
    reasons = dict(zip(err["ann_id"].to_pylist(), err["reason"].to_pylist()))
    assert "not a recognised image format" in reasons[2]
    assert "not a regular file" in reasons[3]


def test_mutation_fuzzer():
    """Issue 26 item 3: 600 seeded mutations of small PNG/JPEG/TIFF/WebP/GIF/BMP seeds: each a
    (H, W, 3) uint8 image or an ImageError; never another exception, a hang (< 2 s each) or a
    large allocation (peak RSS grows < 200 MB)."""
    seeds = seed_images()
    seeds.update({f: encode(np.full((16, 16, 3), 7, np.uint8), f) for f in ("IM", "DDS", "EPS")})
    names = sorted(seeds)
    rng = np.random.default_rng(26)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"image": 0, "error": 0}
    for k in range(600):
        data = mutate(seeds[names[k % len(names)]], rng)
        t = time.time()
        try:
            out = decode_image(data, max_pixels=1 << 20)
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            outcomes["image"] += 1
        except ImageError:
            outcomes["error"] += 1
        assert time.time() - t < 2.0, (names[k % len(names)], k)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 << 10  # KiB
    assert outcomes["image"] > 50 and outcomes["error"] > 50, outcomes  # both sides exercised


def test_s3_images_same_rules(s3_bucket):
    """On s3: the object's size (metadata) is checked before its body is read; a prefix or a
    missing key is a missing file; the format allow-list holds."""
    from exits import storage

    root = f"{s3_bucket}/imgs"
    good = encode(np.zeros((16, 16, 3), np.uint8), "PNG")
    storage.write_bytes(f"{root}/a.png", good)
    storage.write_bytes(f"{root}/sub/b.png", good)
    storage.write_bytes(f"{root}/eps.png", encode(np.zeros((16, 16, 3), np.uint8), "EPS"))
    assert load_image_under(root, "a.png").shape == (16, 16, 3)
    assert read_image_size(f"{root}/a.png") == (16, 16)
    with pytest.raises(ImageError, match=f"{len(good)} bytes exceeds data.max_image_bytes"):
        load_image_under(root, "a.png", max_bytes=len(good) - 1)
    for name in ("missing.png", "sub"):
        with pytest.raises(ImageError, match="^missing image file"):
            load_image_under(root, name)
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image_under(root, "eps.png")
