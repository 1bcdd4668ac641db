"""What every stage adapter shares: the run directory's layout and the prepared data paths."""

from __future__ import annotations

from exits import manifest

STAGES = manifest.STAGES


def stage_uri(run: str, stage: str, *parts: str) -> str:
    """``<run>/<stage>/<parts...>`` (local path or URI)."""
    return manifest.stage_uri(run, stage, *parts)


def data_paths(run: str) -> dict:
    """The data paths the prepare stage resolved (its manifest's ``data``)."""
    m = manifest.read_manifest(run, "prepare")
    if m is None:
        raise RuntimeError(f"stage 'prepare' has not run in {run}")
    return m["data"]
