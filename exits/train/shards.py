"""This worker's rows of the instance table, read from its Parquet parts a window at a time.

Stage 1a/1b workers never hold the whole instance table (1.27 M rows for LVIS). The row count
comes from the Parquet footers (:func:`table_layout`); each epoch every rank draws the order
``torch.utils.data.DistributedSampler(shuffle=True, drop_last=True)`` gives for (seed, epoch)
from that count alone (:func:`epoch_order`: 8 bytes per row of this rank's share), and the rows
of ``window`` consecutive positions are fetched together (:func:`read_rows`: one pass over the
row groups that hold them, only the columns the crops need, no GT RLE). A worker's memory is
then its index array plus one window plus one row group, whatever the table's size; the cost
is one read of the small columns per window (``ceil(rows / (world * window))`` per epoch).

Row numbers are global: the concatenation of the parts in ``pyarrow.dataset`` order (the order
``exits.data.coco.read_table`` reads them in), each part's row groups in file order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from exits import storage

# the instance-table columns a training crop needs (exits.train.data.CropDataset, row_box)
TRAIN_COLUMNS = ("ann_id", "file_name", "height", "width", "bbox", "extreme_points")


@dataclass(frozen=True)
class TableLayout:
    """Where each row of a (sharded) Parquet table lives; built from the footers only.

    Args:
        filesystem: the pyarrow filesystem of ``files``.
        files: the Parquet files, in table order.
        groups: (G, 2) int64, (file index, row group index) of each row group, in table order.
        starts: (G + 1,) int64, global row number of each row group's first row; the last
            entry is the table's row count.
    """

    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    groups: np.ndarray
    starts: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])


def table_layout(uri: str) -> TableLayout:
    """The layout of a Parquet file or a directory of Parquet parts (footers only)."""
    fs, path = storage.get_filesystem(uri)
    files = tuple(pads.dataset(path, filesystem=fs, format="parquet").files)
    groups, sizes = [], []
    for f, name in enumerate(files):
        meta = pq.ParquetFile(name, filesystem=fs).metadata
        for g in range(meta.num_row_groups):
            groups.append((f, g))
            sizes.append(meta.row_group(g).num_rows)
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    return TableLayout(fs, files, np.array(groups, np.int64).reshape(-1, 2), starts)


def epoch_order(num_rows: int, world: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """(num_rows // world,) int64: the rows ``rank`` visits in ``epoch``, in order.

    Equal to ``list(DistributedSampler(range(num_rows), world, rank, shuffle=True, seed=seed,
    drop_last=True))`` after ``set_epoch(epoch)``: a permutation from a torch generator seeded
    with seed + epoch, cut to a multiple of ``world``, every ``world``-th entry from ``rank``.
    The ranks' orders partition ``world * (num_rows // world)`` rows.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(num_rows, generator=g).numpy()  # (num_rows,) int64, freed below
    return perm[rank : (num_rows // world) * world : world].copy()


def read_rows(
    layout: TableLayout, rows: np.ndarray, columns: tuple[str, ...] | None = TRAIN_COLUMNS
) -> pa.Table:
    """The table's ``rows`` (global row numbers, any order, repeats allowed), in that order.

    Reads only the row groups that hold them, one at a time, and only ``columns``.
    Raises IndexError naming a row outside the table.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= layout.num_rows):
        bad = int(rows[(rows < 0) | (rows >= layout.num_rows)][0])
        raise IndexError(f"row {bad} outside the instance table of {layout.num_rows} rows")
    cols = list(columns) if columns is not None else None
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    group = np.searchsorted(layout.starts, srt, side="right") - 1  # (len,) row group per row
    bounds = np.flatnonzero(np.diff(group)) + 1
    # one thread, no pre-buffering on local disk: measured 24 MB of peak RSS less than the
    # defaults for 12 passes over a 200 k-row table (Arrow's thread pools and their heaps);
    # on s3 pre-buffering turns a row group's column chunks into one request
    fs = layout.filesystem
    remote = not isinstance(fs, pafs.LocalFileSystem)
    pieces, open_file, handle = [], -1, None
    for chunk in np.split(np.arange(len(srt)), bounds) if len(srt) else []:
        g = int(group[chunk[0]])
        f, rg = (int(v) for v in layout.groups[g])
        if f != open_file:  # rows sorted: each file's row groups come together
            handle = pq.ParquetFile(layout.files[f], filesystem=fs, pre_buffer=remote)
            open_file = f
        part = handle.read_row_group(rg, columns=cols, use_threads=False)
        pieces.append(part.take(pa.array(srt[chunk] - layout.starts[g])))
    if not pieces:
        if not layout.files:
            raise ValueError("the instance table has no Parquet files")
        schema = pq.ParquetFile(layout.files[0], filesystem=layout.filesystem).schema_arrow
        return schema.empty_table().select(cols) if cols is not None else schema.empty_table()
    table = pa.concat_tables(pieces).combine_chunks()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return table.take(pa.array(inverse))


def shard_windows(order: np.ndarray, batch_size: int, window: int) -> list[np.ndarray]:
    """``order`` cut after its last whole batch (drop_last) into windows of whole batches
    (``window`` rounded down to a multiple of ``batch_size``, at least one batch)."""
    whole = (len(order) // batch_size) * batch_size
    per = max(1, window // batch_size) * batch_size
    return [order[s : min(s + per, whole)] for s in range(0, whole, per)]


__all__ = [
    "TRAIN_COLUMNS",
    "TableLayout",
    "epoch_order",
    "read_rows",
    "shard_windows",
    "table_layout",
]
