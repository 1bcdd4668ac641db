"""Training crops from the instance table (a torch Dataset; each Ray Train worker reads its shard).

:class:`ShardedInstances` is what a stage-1 worker holds: the table's layout, not its rows; an
epoch's batches come from windows of rows read on demand (``exits.train.shards``).

One item = one instance: its crop at a random (train) or fixed (eval) enlargement, resized to
S x S, plus the geometry the losses need, all in *crop pixel edge* coordinates (pixel u spans
[u, u+1)). A horizontal flip (train) is applied here, before the student/teacher split, so it
is shared by both (MAL); photometric augmentations are student-only (transforms.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from exits.data.crops import (
    INFERENCE_ENLARGE,
    TRAIN_MAX_ENLARGE,
    TRAIN_MEAN_ENLARGE,
    box_mask_in_crop,
    crop_and_resize,
    enlarge_box,
    image_to_crop,
    random_enlarge_box,
    row_box,
)
from exits.data.images import load_image_under
from exits.train.shards import TRAIN_COLUMNS, epoch_order, read_rows, shard_windows, table_layout

LEFT, RIGHT = 1, 3  # indices in (top, left, bottom, right)


@dataclass
class CropSpec:
    size: int
    train: bool
    mean_enlarge: float = TRAIN_MEAN_ENLARGE
    max_enlarge: float = TRAIN_MAX_ENLARGE
    inference_enlarge: float = INFERENCE_ENLARGE
    flip_prob: float = 0.5


def _box_midpoints(box: np.ndarray) -> np.ndarray:
    """Stand-in points (side midpoints) for box-only rows; they are flagged has_points=False."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5
    return np.array([[cx, y0], [x0, cy], [cx, y1 - 1], [x1 - 1, cy]])


class CropDataset(Dataset):
    """Instance crops for stage-1 training / evaluation.

    Items are dicts of tensors:
        image (3, S, S) uint8 RGB; valid (S, S) bool (inside the image);
        points (4, 2) float32 extreme points (x, y) in crop pixel-index coords;
        box (4,) float32 [x0, y0, x1, y1] in crop edge coords; box_mask (S, S) bool;
        has_points bool; gt (S, S) bool crop of the GT mask (zeros when absent or when the
        table has no ``gt_segmentation`` column); index int (the row's number in the whole
        table: ``row_ids[i]`` when given, else i).

    The random enlargement and flip of item i at epoch e are drawn from (seed, e, index), so
    a row gives the same crop whichever subset of the table holds it.
    """

    def __init__(
        self,
        table: pa.Table,
        images: str,
        spec: CropSpec,
        seed: int = 0,
        cache_images: int = 256,
        row_ids: np.ndarray | None = None,
        max_image_bytes: int | None = None,  # data.max_image_bytes; None: as prepare checked
    ):
        # rows are read one at a time from the Arrow table: a worker holds the columns (a few
        # hundred bytes per instance plus its GT RLE), not one Python dict per instance
        self.table = table.combine_chunks()
        if row_ids is not None and len(row_ids) != table.num_rows:
            raise ValueError(f"{len(row_ids)} row ids for {table.num_rows} rows")
        self.row_ids = None if row_ids is None else np.asarray(row_ids, dtype=np.int64)
        self.images = images
        self.spec = spec
        self.seed = seed
        self.epoch = 0
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_images
        self.max_image_bytes = max_image_bytes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.table.num_rows

    def _image(self, file_name: str) -> np.ndarray:
        if file_name in self._cache:
            self._cache.move_to_end(file_name)
            return self._cache[file_name]
        img = load_image_under(self.images, file_name, max_bytes=self.max_image_bytes)
        self._cache[file_name] = img
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return img

    def __getitem__(self, index: int) -> dict:
        row = self.table.slice(index, 1).to_pylist()[0]
        spec = self.spec
        if self.row_ids is not None:
            index = int(self.row_ids[index])
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = self._image(row["file_name"])
        box, pts = row_box(row)
        has_points = pts is not None
        if pts is None:
            pts = _box_midpoints(box)
        if spec.train:
            crop_box = random_enlarge_box(box, rng, spec.mean_enlarge, spec.max_enlarge)
        else:
            crop_box = enlarge_box(box, spec.inference_enlarge)
        S = spec.size
        crop, valid = crop_and_resize(image, crop_box, S)
        gt = np.zeros((S, S), bool)
        if row.get("gt_segmentation"):
            from exits.data.coco import instance_mask

            m = instance_mask(row).astype(np.uint8) * 255
            gt = crop_and_resize(m, crop_box, S)[0] >= 128
        cpts = image_to_crop(pts, crop_box, S)  # (4, 2) pixel-index coords
        sx, sy = S / (crop_box[2] - crop_box[0]), S / (crop_box[3] - crop_box[1])
        cbox = np.array(
            [
                (box[0] - crop_box[0]) * sx,
                (box[1] - crop_box[1]) * sy,
                (box[2] - crop_box[0]) * sx,
                (box[3] - crop_box[1]) * sy,
            ]
        )
        box_mask = box_mask_in_crop(box, crop_box, S)
        if spec.train and rng.random() < spec.flip_prob:
            crop, valid, gt, box_mask = (
                crop[:, ::-1],
                valid[:, ::-1],
                gt[:, ::-1],
                box_mask[:, ::-1],
            )
            cpts = cpts.copy()
            cpts[:, 0] = S - 1 - cpts[:, 0]
            cpts[[LEFT, RIGHT]] = cpts[[RIGHT, LEFT]]  # left and right extreme points swap roles
            cbox = np.array([S - cbox[2], cbox[1], S - cbox[0], cbox[3]])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1),
            "valid": torch.from_numpy(np.ascontiguousarray(valid)),
            "points": torch.from_numpy(cpts.astype(np.float32)),
            "box": torch.from_numpy(cbox.astype(np.float32)),
            "box_mask": torch.from_numpy(np.ascontiguousarray(box_mask)),
            "has_points": torch.tensor(has_points),
            "gt": torch.from_numpy(np.ascontiguousarray(gt)),
            "index": torch.tensor(index),
        }


# rows per window a worker reads at once (~130 bytes each in TRAIN_COLUMNS: ~2 MB)
WINDOW_ROWS = 16384


class ShardedInstances:
    """The instance table as a stage-1 worker holds it: its layout (Parquet footers), never
    its rows; ``len`` is the table's row count.

    Args:
        uri: the instance table (a Parquet file or a directory of parts, local or s3).
        images: URI prefix of the images. spec: the crops. seed: the run's seed (order and
            augmentation). window: rows read at once (rounded to whole batches).
    """

    def __init__(
        self, uri: str, images: str, spec: CropSpec, seed: int = 0, window: int = WINDOW_ROWS
    ):
        self.layout = table_layout(uri)
        self.images, self.spec, self.seed, self.window = images, spec, seed, window

    def __len__(self) -> int:
        return self.layout.num_rows

    def crops(self, rows: np.ndarray) -> CropDataset:
        """A ``CropDataset`` of ``rows`` (global row numbers), read now (no GT column)."""
        table = read_rows(self.layout, rows, TRAIN_COLUMNS)
        return CropDataset(table, self.images, self.spec, seed=self.seed, row_ids=rows)

    def epoch_batches(self, rank: int, world: int, epoch: int, batch_size: int,
                      skip_batches: int = 0, loader_workers: int = 0) -> Iterator[dict]:  # fmt: skip
        """This rank's collated batches of ``epoch`` after the first ``skip_batches``: the
        batches a ``DistributedSampler(shuffle=True, seed, drop_last=True)`` + ``DataLoader(
        drop_last=True)`` over the whole table gives, read a window at a time; crops are cut
        by ``loader_workers`` DataLoader processes (0: in this process)."""
        order = epoch_order(len(self), world, rank, self.seed, epoch)[skip_batches * batch_size :]
        for rows in shard_windows(order, batch_size, self.window):
            dataset = self.crops(rows)
            dataset.set_epoch(epoch)
            yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True,
                                  num_workers=loader_workers, persistent_workers=False)  # fmt: skip
