"""Embedded synthetic demo dataset (COCO format), deterministic for a given seed.

Each image has a textured, shaded background and 2-4 objects of a few shape classes. Objects
are *not* separable by colour alone: object and background colours come from one shared
palette, both carry texture (stripes / checks / noise) and a shading gradient, and objects
overlap each other. Thin occluder bars (not annotated) are drawn across a good share of the
objects, splitting their visible mask into >= 2 parts: the paper's "separated object" case.

Usage:
    python -m exits.data.synthetic --out demo_data --num-images 96 --seed 0 [--overlay o.png]

Writes ``<out>/images/*.png``, ``<out>/annotations/instances_train.json`` and
``instances_val.json`` (the last ``val_fraction`` of the images), GT masks as COCO RLE.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from exits.data import rle

CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
]
# One palette for background and objects, so no class owns a colour.
PALETTE = np.array(
    [
        [200, 60, 50], [60, 150, 70], [50, 80, 190], [210, 180, 60], [150, 90, 170],
        [90, 180, 190], [140, 110, 80], [190, 190, 190], [100, 100, 100], [230, 130, 160],
    ],
    dtype=np.float32,
)  # fmt: skip
MIN_VISIBLE_AREA = 40  # px: objects occluded below this are not annotated


@dataclass
class SyntheticConfig:
    """Demo-set generator settings."""

    num_images: int = 96  # total images (train + val)
    image_size: int = 128  # square images, side in pixels
    min_objects: int = 2
    max_objects: int = 4
    min_object_size: int = 28  # object bounding size range (px)
    max_object_size: int = 60
    occluder_prob: float = 0.45  # chance an object gets an occluder bar across it
    val_fraction: float = 0.25  # last fraction of images goes to the val split
    seed: int = 0


def _texture(rng: np.random.Generator, size: int, base: np.ndarray, alt: np.ndarray) -> np.ndarray:
    """(size, size, 3) float texture mixing two colours: stripes, checks or blotchy noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes at a random angle and period
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    elif kind == 1:  # checks
        period = rng.integers(4, 10)
        t = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    else:  # smooth blotches: upsampled noise
        coarse = rng.random((size // 8 + 2, size // 8 + 2)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    mix = rng.uniform(0.25, 0.6)
    t = (t * mix)[..., None]
    return base[None, None] * (1 - t) + alt[None, None] * t


def _shading(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 1) multiplicative linear shading gradient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-0.35, 0.35, size=2)
    return (1.0 + gx * (xx - 0.5) + gy * (yy - 0.5))[..., None]


def _shape_mask(
    rng: np.random.Generator, size: int, cls: int, cx: float, cy: float, s: float
) -> np.ndarray:
    """(size, size) bool mask of one shape of class ``cls`` centred at (cx, cy), extent ~s."""
    m = np.zeros((size, size), np.uint8)
    ang = rng.uniform(0, 360)
    if cls == 1:  # disc / ellipse
        axes = (int(s / 2), int(s / 2 * rng.uniform(0.6, 1.0)))
        cv2.ellipse(m, (int(cx), int(cy)), axes, ang, 0, 360, 1, -1)
    elif cls == 2:  # rotated square / rectangle
        rect = ((cx, cy), (s * 0.8, s * 0.8 * rng.uniform(0.6, 1.0)), ang)
        cv2.fillPoly(m, [cv2.boxPoints(rect).astype(np.int32)], 1)
    elif cls == 3:  # triangle
        a0 = np.deg2rad(ang)
        pts = [
            (
                cx + s / 2 * np.cos(a0 + k * 2 * np.pi / 3),
                cy + s / 2 * np.sin(a0 + k * 2 * np.pi / 3),
            )
            for k in range(3)
        ]
        cv2.fillPoly(m, [np.array(pts, np.int32)], 1)
    else:  # cross (plus sign), rotated
        arm = s * rng.uniform(0.25, 0.35)
        for w, h in ((s, arm), (arm, s)):
            rect = ((cx, cy), (w, h), ang)
            cv2.fillPoly(m, [cv2.boxPoints(rect).astype(np.int32)], 1)
    return m.astype(bool)


def _occluder_bar(
    rng: np.random.Generator, size: int, cx: float, cy: float, s: float
) -> np.ndarray:
    """(size, size) bool thin bar through (cx, cy), long enough to cut an object of extent s."""
    m = np.zeros((size, size), np.uint8)
    rect = ((cx, cy), (s * 2.2, max(3.0, s * rng.uniform(0.12, 0.22))), rng.uniform(0, 180))
    cv2.fillPoly(m, [cv2.boxPoints(rect).astype(np.int32)], 1)
    return m.astype(bool)


def render_image(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, list[dict]]:
    """Render one image; returns (H, W, 3) uint8 and a list of {category_id, mask} (visible)."""
    size = cfg.image_size
    bg_a, bg_b = PALETTE[rng.choice(len(PALETTE), size=2, replace=False)]
    img = _texture(rng, size, bg_a, bg_b) * _shading(rng, size)
    objects: list[dict] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        cls = int(rng.integers(1, len(CATEGORIES) + 1))
        s = rng.uniform(cfg.min_object_size, cfg.max_object_size)
        cx, cy = rng.uniform(s / 3, size - s / 3, size=2)
        mask = _shape_mask(rng, size, cls, cx, cy, s)
        if mask.sum() < MIN_VISIBLE_AREA:
            continue
        # object colour: any palette colour, jittered; may equal the background's
        base = np.clip(PALETTE[rng.integers(len(PALETTE))] + rng.normal(0, 18, 3), 0, 255)
        alt = PALETTE[rng.integers(len(PALETTE))]
        tex = _texture(rng, size, base, alt) * _shading(rng, size)
        img[mask] = tex[mask]
        for o in objects:  # later objects occlude earlier ones
            o["mask"] &= ~mask
        objects.append({"category_id": cls, "mask": mask.copy()})
        if rng.random() < cfg.occluder_prob:
            bar = _occluder_bar(rng, size, cx, cy, s)
            bar_col = _texture(rng, size, PALETTE[rng.integers(len(PALETTE))], bg_a)
            img[bar] = bar_col[bar]
            for o in objects:
                o["mask"] &= ~bar
    noise = rng.normal(0, 6, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    kept = [o for o in objects if o["mask"].sum() >= MIN_VISIBLE_AREA]
    return img, kept


def write_demo_dataset(
    out_dir: str, num_images: int = 96, image_size: int = 128, seed: int = 0, **overrides
) -> dict:
    """Generate the demo set under ``out_dir`` (idempotent for the same arguments).

    Returns:
        {"images": dir, "annotations": train json, "val_annotations": val json,
         "categories": [...], "num_instances": {"train": n, "val": n}}
    """
    cfg = SyntheticConfig(num_images=num_images, image_size=image_size, seed=seed, **overrides)
    img_dir = os.path.join(out_dir, "images")
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    n_val = int(round(cfg.num_images * cfg.val_fraction))
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    ann_id = 1
    for i in range(cfg.num_images):
        img, objects = render_image(rng, cfg)
        name = f"demo_{i:05d}.png"
        cv2.imwrite(os.path.join(img_dir, name), img[..., ::-1])
        split = "val" if i >= cfg.num_images - n_val else "train"
        image_id = i + 1
        splits[split]["images"].append(
            {"id": image_id, "file_name": name, "height": image_size, "width": image_size}
        )
        for o in objects:
            segm = rle.encode(o["mask"])
            splits[split]["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": o["category_id"],
                    "segmentation": segm,
                    "area": float(rle.area(segm)),
                    "bbox": rle.bbox(segm),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    paths = {}
    for split, data in splits.items():
        path = os.path.join(ann_dir, f"instances_{split}.json")
        data["categories"] = CATEGORIES
        data["info"] = {"description": "exits synthetic demo set", "config": asdict(cfg)}
        with open(path, "w") as f:
            json.dump(data, f)
        paths[split] = path
    return {
        "images": img_dir,
        "annotations": paths["train"],
        "val_annotations": paths["val"],
        "categories": CATEGORIES,
        "num_instances": {k: len(v["annotations"]) for k, v in splits.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_data", help="output directory")
    p.add_argument("--num-images", type=int, default=SyntheticConfig.num_images)
    p.add_argument("--image-size", type=int, default=SyntheticConfig.image_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overlay", default=None, help="also write a PNG overlay of a few images")
    args = p.parse_args(argv)
    info = write_demo_dataset(args.out, args.num_images, args.image_size, args.seed)
    print(json.dumps({k: v for k, v in info.items() if k != "categories"}))
    if args.overlay:
        from exits.data.visualize import overlay_dataset

        overlay_dataset(info["annotations"], info["images"], args.overlay)
        print(f"overlay written to {args.overlay}")


if __name__ == "__main__":
    main()
