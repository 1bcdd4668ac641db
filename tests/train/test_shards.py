"""Stage-1 ingest without the whole table: per-rank order, windowed row reads, resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from exits.data.coco import read_table, write_table
from exits.data.prepare import load_instances
from exits.train.data import CropDataset, CropSpec, ShardedInstances
from exits.train.shards import (
    TRAIN_COLUMNS,
    epoch_order,
    read_rows,
    shard_windows,
    table_layout,
)

S = 64


@pytest.mark.parametrize(
    "n, world, seed, epoch", [(11, 3, 0, 0), (12, 3, 5, 2), (2, 3, 1, 1), (40, 1, 7, 3)]
)
def test_epoch_order_is_distributed_samplers(n, world, seed, epoch):
    """The reference: torch's DistributedSampler(shuffle, drop_last) on a table of n rows."""
    parts = []
    for rank in range(world):
        sampler = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        ours = epoch_order(n, world, rank, seed, epoch)
        assert ours.dtype == np.int64 and ours.tolist() == list(sampler)
        parts.append(ours)
    # the ranks partition world * (n // world) rows: each at most once, none twice
    rows = np.concatenate(parts)
    assert len(rows) == world * (n // world) == len(set(rows.tolist()))
    assert not np.array_equal(epoch_order(n, 1, 0, seed, epoch), epoch_order(n, 1, 0, seed, 9))


def test_epoch_order_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank 3 outside"):
        epoch_order(10, 3, 3, 0, 0)


def test_shard_windows_hold_whole_batches_and_drop_the_last_partial_one():
    w = shard_windows(np.arange(23), batch_size=4, window=10)  # windows of 8, 20 whole rows
    assert [x.tolist() for x in w] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    assert [len(x) for x in shard_windows(np.arange(7), 4, 1)] == [4]  # at least one batch


def _parts(tmp_path, table: pa.Table, rows_per_part: int, row_group: int) -> str:
    """``table`` as a directory of parts, each with several row groups."""
    out = tmp_path / "instances.parquet"
    out.mkdir()
    for i, start in enumerate(range(0, table.num_rows, rows_per_part)):
        part = table.slice(start, rows_per_part)
        pq.write_table(part, out / f"part-{i:05d}.parquet", row_group_size=row_group)
    return str(out)


def test_read_rows_equals_the_whole_table_take(tmp_path):
    n = 103
    table = pa.table(
        {
            "ann_id": pa.array(np.arange(n) * 10 + 7, pa.int64()),
            "file_name": [f"img{i % 9}.jpg" for i in range(n)],
            "height": pa.array(np.full(n, 50), pa.int32()),
            "width": pa.array(np.full(n, 60), pa.int32()),
            "bbox": pa.array([[i, 1.0, i + 5.0, 9.0] for i in range(n)], pa.list_(pa.float64(), 4)),
            "extreme_points": pa.array([None] * n, pa.list_(pa.list_(pa.int32(), 2), 4)),
            "gt_segmentation": ["x" * 500] * n,
        }
    )
    uri = _parts(tmp_path, table, rows_per_part=40, row_group=15)
    layout = table_layout(uri)
    # 3 parts (40, 40, 23 rows) of row groups of 15: 3 + 3 + 2 groups
    assert layout.num_rows == n and len(layout.files) == 3
    assert layout.starts.tolist() == [0, 15, 30, 40, 55, 70, 80, 95, 103]
    whole = read_table(uri)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.permutation(n)[:50], [0, 102, 0, 40]])  # any order, repeats
    got = read_rows(layout, rows)
    assert got.column_names == list(TRAIN_COLUMNS)  # no GT RLE read
    assert got.to_pylist() == whole.select(list(TRAIN_COLUMNS)).take(pa.array(rows)).to_pylist()
    assert read_rows(layout, np.array([], np.int64)).num_rows == 0
    with pytest.raises(IndexError, match="row 103 outside the instance table of 103 rows"):
        read_rows(layout, np.array([5, 103]))


@pytest.fixture(scope="module")
def table(demo_dataset):
    inst, err = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    assert err.num_rows == 0
    return inst


def _old_batches(table, images, spec, seed, rank, world, epoch, bs, skip):
    """Today's loader (before the sharded read): DistributedSampler over the whole table."""
    dataset = CropDataset(table, images, spec, seed=seed)
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    indices = list(sampler)[skip * bs :]
    return list(DataLoader(Subset(dataset, indices), batch_size=bs, shuffle=False, drop_last=True))


def test_sharded_batches_equal_the_whole_table_loader(tmp_path, table, demo_dataset):
    """Same crops (enlargement, flip), same order, same resume point as the old loader, read a
    window of 8 rows at a time from a table of parts; the ranks' batches partition the rows."""
    uri = _parts(tmp_path, table, rows_per_part=13, row_group=5)
    images = demo_dataset["images"]
    spec = CropSpec(size=S, train=True)
    src = ShardedInstances(uri, images, spec, seed=3, window=8)
    assert len(src) == table.num_rows
    world, bs, epoch = 2, 3, 1
    seen = []
    for rank in range(world):
        new = list(src.epoch_batches(rank, world, epoch, bs))
        old = _old_batches(table, images, spec, 3, rank, world, epoch, bs, 0)
        assert len(new) == len(old) == (table.num_rows // world) // bs
        for a, b in zip(new, old, strict=True):
            for k in ("image", "valid", "points", "box", "box_mask", "has_points", "index"):
                assert torch.equal(a[k], b[k]), k
            assert not a["gt"].any()  # GT not read for training
        seen += torch.cat([b["index"] for b in new]).tolist()
        # a restart at batch 2 gives exactly the remaining batches
        resumed = list(src.epoch_batches(rank, world, epoch, bs, skip_batches=2))
        assert len(resumed) == len(new) - 2
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, new[2:]))
        assert all(torch.equal(a["index"], b["index"]) for a, b in zip(resumed, new[2:]))
    assert len(seen) == len(set(seen))  # no row twice in an epoch across ranks


def test_cache_crops_are_the_rows_crops(tmp_path, table, demo_dataset):
    """``crops(rows)`` gives row r the crop the whole-table dataset gives it (the token
    cache's views stay the same)."""
    write_table(table, str(tmp_path / "one.parquet"))
    spec = CropSpec(size=S, train=True)
    src = ShardedInstances(str(tmp_path / "one.parquet"), demo_dataset["images"], spec, seed=1)
    whole = CropDataset(table, demo_dataset["images"], spec, seed=1)
    rows = np.array([5, 0, 9])
    part = src.crops(rows)
    for ds in (part, whole):
        ds.set_epoch(2)
    for i, r in enumerate(rows):
        a, b = part[i], whole[int(r)]
        assert int(a["index"]) == r and torch.equal(a["image"], b["image"])
        assert torch.equal(a["points"], b["points"])
