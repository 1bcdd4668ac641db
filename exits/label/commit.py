"""Stage 1c exactly-once commit: the driver publishes each output shard once it holds all of its
instances (errors file, then the masks file as the commit marker), lists committed shards on a
re-run, reads the shards back (export, report) and verifies every input is there exactly once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from exits import manifest, storage
from exits.data.coco import ERROR_SCHEMA, error_row, read_table, write_table
from exits.label.plan import MASK_SCHEMA, PREPARE_ERRORS, STAGE, instance_parts

SHARD_FORMAT = "shard-{:05d}.parquet"


class OutputMismatch(RuntimeError):
    """The label outputs do not hold every input instance exactly once."""


def shard_uri(output: str, kind: str, shard: int) -> str:
    return manifest.stage_uri(output, STAGE, kind, SHARD_FORMAT.format(shard))


def committed_shards(output: str) -> set[int]:
    """Shards whose masks file (the commit marker) exists."""
    done = set()
    for uri in storage.list_dir(manifest.stage_uri(output, STAGE, "masks")):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet"):
            done.add(int(name[len("shard-") : -len(".parquet")]))
    return done


# --------------------------------------------------------------------------------------
# Driver: commit shards exactly once
# --------------------------------------------------------------------------------------
class ShardCommitter:
    """Buffers result rows per shard (keyed by ann_id) and publishes each shard once complete.

    Args:
        output: run directory URI.
        expected: shard -> the sorted ann_ids it must hold (``exits.label.plan.expected_ids``).
    """

    def __init__(self, output: str, expected: dict[int, np.ndarray]) -> None:
        self.output = output
        self.expected = expected
        self.buffers: dict[int, dict[int, dict]] = {}
        self.committed: list[int] = []
        self.counts = {"masks": 0, "errors": 0, "empty_masks": 0, "crops": 0}

    def add(self, table: pa.Table) -> None:
        shards, ids = table["shard"].to_numpy(), table["ann_id"].to_numpy()
        for shard in np.unique(shards).tolist():
            mine = shards == shard
            want = self.expected.get(shard, np.empty(0, np.int64))
            stray = ids[mine][~np.isin(ids[mine], want)]
            if len(stray):
                raise OutputMismatch(
                    f"pipeline returned ann_id {stray[0]} not planned for shard {shard}"
                )
            buffer = self.buffers.setdefault(shard, {})
            for row in table.filter(pa.array(mine)).drop_columns(["shard"]).to_pylist():
                # keyed by ann_id: a retried task overwrites its rows, never duplicates them
                buffer[row["ann_id"]] = row
            if len(buffer) == len(want):
                self._commit(shard)

    def _commit(self, shard: int) -> None:
        buffered = self.buffers.pop(shard)
        rows = [buffered[a] for a in self.expected[shard].tolist()]
        errors = [
            error_row(r["ann_id"], r["image_id"], STAGE, r["reason"]) for r in rows if r["reason"]
        ]
        masks = [{k: r[k] for k in MASK_SCHEMA.names} for r in rows if not r["reason"]]
        write_table(
            pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
            shard_uri(self.output, "errors", shard),
        )
        write_table(
            pa.Table.from_pylist(masks, schema=MASK_SCHEMA), shard_uri(self.output, "masks", shard)
        )
        self.committed.append(shard)
        self.counts["masks"] += len(masks)
        self.counts["errors"] += len(errors)
        self.counts["crops"] += len(masks)
        self.counts["empty_masks"] += sum(1 for m in masks if m["area"] == 0)

    def check_complete(self) -> None:
        missing = sorted(set(self.expected) - set(self.committed))
        if missing:
            lost = {
                s: np.setdiff1d(self.expected[s], list(self.buffers.get(s, {})))[:5].tolist()
                for s in missing[:5]
            }
            raise OutputMismatch(
                f"{len(missing)} shards incomplete after the pipeline ended; e.g. missing {lost}"
            )


def _read_dir(
    uri: str, schema: pa.Schema, skip: tuple[str, ...] = (), columns: list[str] | None = None
) -> pa.Table:
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    tables = [
        read_table(f, columns).cast(schema)
        for f in storage.list_dir(uri)
        if f.endswith(".parquet") and f.rsplit("/", 1)[-1] not in skip
    ]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_masks(output: str, columns: list[str] | None = None) -> pa.Table:
    """All committed mask rows of a run (MASK_SCHEMA; ``columns``: only those)."""
    return _read_dir(manifest.stage_uri(output, STAGE, "masks"), MASK_SCHEMA, columns=columns)


def read_errors(
    output: str, include_prepare: bool = True, columns: list[str] | None = None
) -> pa.Table:
    """All error rows of a run (coco.ERROR_SCHEMA); label errors plus carried prepare errors."""
    skip = () if include_prepare else (PREPARE_ERRORS,)
    return _read_dir(manifest.stage_uri(output, STAGE, "errors"), ERROR_SCHEMA, skip, columns)


def verify_outputs(
    output: str, instances: pa.Table | str | np.ndarray, upstream_errors: pa.Table | None = None
) -> dict[str, int]:
    """Check that every input instance is in the outputs exactly once (mask or error row).

    ``instances``: the instance table (Arrow or Parquet URI, read part by part) or its ann_ids.

    Raises:
        OutputMismatch: on any missing, duplicated or unexpected ann_id, listing examples.

    Returns:
        {"instances", "masks", "errors" (label stage), "prepare_errors", "empty_masks"}, over
        every committed shard (this run's and earlier runs').
    """
    if isinstance(instances, np.ndarray):
        want = instances
    else:
        parts = [p["ann_id"].to_numpy() for p in instance_parts(instances)]
        want = np.concatenate(parts) if parts else np.empty(0, np.int64)
    masks = read_masks(output, columns=["ann_id", "area"])
    errors = read_errors(output, include_prepare=False, columns=["ann_id"])
    got = np.concatenate([masks["ann_id"].to_numpy(), errors["ann_id"].to_numpy()])
    ids, counts = np.unique(got, return_counts=True)
    duplicated = ids[counts > 1]
    missing = np.setdiff1d(want, ids)
    unexpected = np.setdiff1d(ids, want)
    if len(duplicated) or len(missing) or len(unexpected):
        raise OutputMismatch(
            f"label outputs at {output}: {len(want)} inputs, {masks.num_rows} masks, "
            f"{errors.num_rows} errors; missing {len(missing)} (e.g. {missing[:5].tolist()}), "
            f"duplicated {len(duplicated)} (e.g. {duplicated[:5].tolist()}), "
            f"unexpected {len(unexpected)} (e.g. {unexpected[:5].tolist()})"
        )
    prepare = storage.join(manifest.stage_uri(output, STAGE, "errors"), PREPARE_ERRORS)
    n_prepare = read_table(prepare).num_rows if storage.exists(prepare) else 0
    if upstream_errors is not None and n_prepare != upstream_errors.num_rows:
        raise OutputMismatch(
            f"{prepare} holds {n_prepare} rows, expected {upstream_errors.num_rows}"
        )
    empty = int((masks["area"].to_numpy(zero_copy_only=False) == 0).sum())
    return {"instances": len(want), "masks": masks.num_rows, "errors": errors.num_rows,
            "prepare_errors": n_prepare, "empty_masks": empty}  # fmt: skip
