"""URI-aware IO on ``pyarrow.fs`` for local paths and ``s3://`` URIs.

Every function takes a URI (``/abs/path``, ``rel/path``, ``file:///...`` or ``s3://bucket/key``)
and an optional ``filesystem`` to use instead of the one resolved from the URI (tests inject a
filesystem; users normally don't).

S3 endpoint: pyarrow's ``S3FileSystem`` ignores ``AWS_ENDPOINT_URL``, so an endpoint override
is read from ``EXITS_S3_ENDPOINT`` (e.g. ``http://127.0.0.1:5000`` for a moto server) or set
with :func:`configure_s3`. Credentials come from the usual AWS environment / instance profile.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV = "EXITS_S3_ENDPOINT"
REGION_ENV = "EXITS_S3_REGION"
COPY_CHUNK = 8 << 20  # bytes per read when uploading a streamed file

_s3_options: dict[str, Any] = {}


def configure_s3(endpoint: str | None = None, region: str | None = None, **kwargs: Any) -> None:
    """Set process-wide S3 options (endpoint override, region, extra S3FileSystem kwargs)."""
    _s3_options.clear()
    if endpoint:
        _s3_options["endpoint"] = endpoint
    if region:
        _s3_options["region"] = region
    _s3_options.update(kwargs)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """An ``S3FileSystem`` honouring :func:`configure_s3` and ``EXITS_S3_ENDPOINT``."""
    endpoint = _s3_options.get("endpoint") or os.environ.get(ENDPOINT_ENV)
    region = _s3_options.get("region") or os.environ.get(REGION_ENV) or "us-east-1"
    extra = {k: v for k, v in _s3_options.items() if k not in ("endpoint", "region")}
    kwargs: dict[str, Any] = {"region": region, **extra}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
    return pafs.S3FileSystem(**kwargs)


def get_filesystem(
    uri: str, filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """Resolve ``uri`` to ``(filesystem, path)``; ``path`` is what the filesystem expects."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        return (filesystem or s3_filesystem()), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = os.path.abspath(uri)
    return (filesystem or pafs.LocalFileSystem()), path


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/' (also for local paths)."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str, filesystem: pafs.FileSystem | None = None) -> bool:
    fs, path = get_filesystem(uri, filesystem)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, filesystem: pafs.FileSystem | None = None) -> bool:
    fs, path = get_filesystem(uri, filesystem)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str, filesystem: pafs.FileSystem | None = None) -> None:
    fs, path = get_filesystem(uri, filesystem)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str, filesystem: pafs.FileSystem | None = None) -> bytes:
    fs, path = get_filesystem(uri, filesystem)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, filesystem: pafs.FileSystem | None = None) -> None:
    fs, path = get_filesystem(uri, filesystem)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_text(uri: str, filesystem: pafs.FileSystem | None = None) -> str:
    return read_bytes(uri, filesystem).decode("utf-8")


def write_text(uri: str, text: str, filesystem: pafs.FileSystem | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), filesystem)


def read_json(uri: str, filesystem: pafs.FileSystem | None = None) -> Any:
    return json.loads(read_bytes(uri, filesystem))


def write_json(uri: str, obj: Any, filesystem: pafs.FileSystem | None = None) -> None:
    publish_bytes(uri, json.dumps(obj, indent=2, default=str).encode("utf-8"), filesystem)


def list_dir(
    uri: str, filesystem: pafs.FileSystem | None = None, recursive: bool = False
) -> list[str]:
    """URIs of the entries under ``uri`` (sorted; empty when it does not exist)."""
    fs, path = get_filesystem(uri, filesystem)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    infos = fs.get_file_info(selector)
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + info.path for info in infos)


def publish_bytes(uri: str, data: bytes, filesystem: pafs.FileSystem | None = None) -> None:
    """Atomically publish ``data`` at ``uri``: readers see the old object or the whole new one.

    Local: write a temp file beside the target and ``os.replace`` it. S3: a single PUT is
    already atomic for readers (objects are never visible half-written).
    """
    fs, path = get_filesystem(uri, filesystem)
    if is_s3(uri) or not isinstance(fs, pafs.LocalFileSystem):
        write_bytes(uri, data, filesystem)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


TEMP_MARK = ".tmp-"  # publish_bytes / publish_stream write "<target>.tmp-<8 hex>" first
_TEMP_RE = re.compile(r"\.tmp-[0-9a-f]{8}$")


def remove_stale_temps(uri: str) -> list[str]:
    """Remove the temp files an interrupted local publish left (``<name>.tmp-<8 hex>``): for a
    directory every one under it, for a file path those of that target. Returns their paths.

    Only safe when no one else is publishing there (the output's lease, :mod:`exits.lease`).
    s3 publishes leave nothing in the bucket (their temp file is local), so s3 is a no-op."""
    if is_s3(uri) or "://" in str(uri).replace("file://", "", 1):
        return []
    path = get_filesystem(uri)[1]
    if os.path.isdir(path):
        found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                 if _TEMP_RE.search(f)]  # fmt: skip
    else:
        parent, base = os.path.split(path)
        found = [os.path.join(parent, f) for f in (os.listdir(parent) if os.path.isdir(parent)
                 else []) if f.startswith(base + TEMP_MARK) and _TEMP_RE.search(f)]  # fmt: skip
    for f in found:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f)
    return found


def upload_dir(local_dir: str, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Copy a local directory tree to ``uri`` (local or s3)."""
    fs, path = get_filesystem(uri, filesystem)
    pafs.copy_files(
        local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def remove(uri: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Delete the file or directory tree at ``uri`` (nothing when absent)."""
    fs, path = get_filesystem(uri, filesystem)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


@contextlib.contextmanager
def publish_stream(uri: str, filesystem: pafs.FileSystem | None = None) -> Iterator[BinaryIO]:
    """Write ``uri`` as a stream, published atomically when the block ends without error.

    The data goes to a local temp file (beside the target when local) that is renamed over the
    target, or uploaded in chunks for S3; memory stays at one buffer whatever the size.
    """
    fs, path = get_filesystem(uri, filesystem)
    local = not is_s3(uri) and isinstance(fs, pafs.LocalFileSystem)
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else tempfile.mkstemp()[1]
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            with open(tmp, "rb") as src, fs.open_output_stream(path) as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
