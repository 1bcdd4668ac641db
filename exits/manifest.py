"""Run directories and stage manifests.

A run directory (local path or ``s3://bucket/prefix``) has one subfolder per stage. Each stage
writes its artifacts first and ``manifest.json`` last, so a manifest means "this stage is done".
The manifest records the stage's inputs, config, code version, counts, metrics and timings; a
re-run skips the stage when a manifest with the same fingerprint (inputs + config) exists.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from typing import Any

from exits import __version__, storage

MANIFEST = "manifest.json"
STAGES = ("prepare", "warmup", "generator", "label", "stage2", "eval")


def stage_uri(run: str, stage: str, *parts: str) -> str:
    return storage.join(run, stage, *parts)


def fingerprint(*objs: Any) -> str:
    """Stable short hash of JSON-serialisable inputs/config."""
    text = json.dumps(objs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_digest(*uris: str) -> dict[str, str]:
    """sha256 (16 hex) of each non-empty URI's bytes: fingerprints cover what an input file
    holds, not only its name, so a json edited in place is redone, never silently reused."""
    out = {}
    for uri in uris:
        if uri:
            fs, path = storage.get_filesystem(uri)
            h = hashlib.sha256()
            with fs.open_input_stream(path) as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            out[uri] = h.hexdigest()[:16]
    return out


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def read_manifest(run: str, stage: str) -> dict | None:
    uri = stage_uri(run, stage, MANIFEST)
    return storage.read_json(uri) if storage.exists(uri) else None


def is_done(run: str, stage: str, fp: str) -> bool:
    m = read_manifest(run, stage)
    return bool(m) and m.get("fingerprint") == fp and m.get("status") == "done"


def write_manifest(run: str, stage: str, fp: str, started: float, **fields: Any) -> dict:
    """Publish the stage's manifest (call last, after every artifact is written)."""
    manifest = {
        "stage": stage,
        "status": "done",
        "fingerprint": fp,
        "code_version": code_version(),
        "started": started,
        "finished": time.time(),
        "seconds": round(time.time() - started, 2),
        **fields,
    }
    storage.write_json(stage_uri(run, stage, MANIFEST), manifest)
    return manifest
