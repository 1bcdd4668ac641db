"""Run directories and stage manifests.

A run directory (local path or ``s3://bucket/prefix``) has one subfolder per stage. Each stage
writes its artifacts first and ``manifest.json`` last, so a manifest means "this stage is done".
The manifest records the stage's inputs, config, code version, counts, metrics and timings; a
re-run skips the stage when a manifest with the same fingerprint (inputs + config) exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from typing import Any

from exits import __version__, storage

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DIGEST_CACHE = "input_digests.json"  # <run>/prepare/: content_digest's cache of local inputs
STAGES = ("prepare", "warmup", "generator", "label", "stage2", "eval")


def stage_uri(run: str, stage: str, *parts: str) -> str:
    return storage.join(run, stage, *parts)


def fingerprint(*objs: Any) -> str:
    """Stable short hash of JSON-serialisable inputs/config."""
    text = json.dumps(objs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_digest(*uris: str, cache: str | None = None) -> dict[str, str]:
    """16-hex identity of each non-empty URI's content: fingerprints cover what an input file
    holds, not only its name, so a json edited in place is redone, never silently reused.

    Cheap on every run (LVIS' json is ~1 GB): an ``s3://`` object is identified by its ETag
    and size from one HEAD request (never downloaded; an object without an ETag is hashed); a
    local file by the sha256 of its bytes, recomputed only when its (size, mtime_ns, ctime_ns)
    differ from the entry in ``cache`` (a json at that URI, e.g. beside the prepare manifest;
    None: always hashed). A file modified within :data:`RACY_NS` of the hash is not cached (a
    same-size rewrite within one timestamp tick would otherwise look unchanged).
    """
    entries = _read_digest_cache(cache)
    changed = False
    out = {}
    for uri in uris:
        if not uri:
            continue
        if storage.is_s3(uri):
            out[uri] = _s3_digest(uri)
            continue
        fs, path = storage.get_filesystem(uri)
        key = _stat_key(path)
        hit = entries.get(path)
        if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("sha256"), str):
            out[uri] = hit["sha256"]
            continue
        out[uri] = _sha256_uri(uri)
        if cache and _stat_key(path) == key and time.time_ns() - key[1] > RACY_NS:
            entries[path], changed = {"stat": key, "sha256": out[uri]}, True
    if changed:
        storage.write_json(cache, entries)
    return out


RACY_NS = 2_000_000_000  # files modified this recently are hashed but not cached


def _sha256_uri(uri: str) -> str:
    """sha256 (16 hex) of the bytes at ``uri`` (read in 16 MiB chunks)."""
    fs, path = storage.get_filesystem(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


def _stat_key(path: str) -> list[int]:
    """[size, mtime_ns, ctime_ns] of a local file (ctime also moves when mtime is reset)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _s3_digest(uri: str) -> str:
    """16 hex of an S3 object's (ETag, size) from its metadata (a HEAD, no body read)."""
    fs, path = storage.get_filesystem(uri)
    with fs.open_input_file(path) as f:
        size, meta = f.size(), f.metadata()
    etag = meta.get("ETag") or meta.get("etag")
    if not etag:
        return _sha256_uri(uri)
    etag = etag.decode() if isinstance(etag, bytes) else str(etag)
    return hashlib.sha256(f"s3-etag:{etag}:{size}".encode()).hexdigest()[:16]


def _read_digest_cache(cache: str | None) -> dict[str, dict]:
    """The cache's {local path: {"stat": [size, mtime_ns, ctime_ns], "sha256": hex16}}; an
    absent or unreadable cache is empty (everything is hashed again)."""
    if not cache or not storage.exists(cache):
        return {}
    try:
        data = storage.read_json(cache)
    except (OSError, ValueError) as e:
        logger.warning("digest cache %s unreadable (%s): hashing the inputs again", cache, e)
        return {}
    return data if isinstance(data, dict) else {}


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
