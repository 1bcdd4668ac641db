"""The prepare fingerprint's input digests: a changed input always changes them, an unchanged
one is not read again (local: stat cache; s3: ETag + size from a HEAD)."""

from __future__ import annotations

import hashlib
import os

import pytest

from exits import manifest, storage

OLD_NS = 1_600_000_000 * 10**9  # a modification time well outside the racy window


def _write(path, data: bytes, mtime_ns: int = OLD_NS) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every URI whose bytes content_digest hashes."""
    seen: list[str] = []
    real = manifest._sha256_uri

    def counting(uri: str) -> str:
        seen.append(uri)
        return real(uri)

    monkeypatch.setattr(manifest, "_sha256_uri", counting)
    return seen


def test_local_digest_is_the_sha256_of_the_bytes(tmp_path) -> None:
    p = tmp_path / "a.json"
    _write(p, b'{"images": []}')
    want = hashlib.sha256(b'{"images": []}').hexdigest()[:16]
    assert manifest.content_digest(str(p), "") == {str(p): want}
    assert manifest.content_digest(str(p), cache=str(tmp_path / "c.json")) == {str(p): want}


def test_unchanged_file_is_not_read_again(tmp_path, reads) -> None:
    p, cache = tmp_path / "a.json", str(tmp_path / "prepare" / manifest.DIGEST_CACHE)
    _write(p, b"x" * 100)
    first = manifest.content_digest(str(p), cache=cache)
    assert reads == [str(p)] and storage.exists(cache)
    assert manifest.content_digest(str(p), cache=cache) == first
    assert reads == [str(p)]  # the second run stat()ed the file only


def test_same_size_new_mtime_changes_the_digest(tmp_path, reads) -> None:
    p, cache = tmp_path / "a.json", str(tmp_path / "c.json")
    _write(p, b"a" * 100)
    before = manifest.content_digest(str(p), cache=cache)[str(p)]
    _write(p, b"b" * 100, OLD_NS + 1)
    assert manifest.content_digest(str(p), cache=cache)[str(p)] != before
    assert len(reads) == 2


def test_same_mtime_different_size_changes_the_digest(tmp_path) -> None:
    p, cache = tmp_path / "a.json", str(tmp_path / "c.json")
    _write(p, b"a" * 100)
    before = manifest.content_digest(str(p), cache=cache)[str(p)]
    _write(p, b"a" * 101)  # the same mtime as before
    assert manifest.content_digest(str(p), cache=cache)[str(p)] != before


def test_same_size_and_mtime_reset_is_caught_by_ctime(tmp_path) -> None:
    """A rewrite that restores size and mtime (``touch -d``, ``cp -p``) still moves ctime."""
    p, cache = tmp_path / "a.json", str(tmp_path / "c.json")
    _write(p, b"a" * 100)
    before = manifest.content_digest(str(p), cache=cache)[str(p)]
    ctime = os.stat(p).st_ctime_ns
    while os.stat(p).st_ctime_ns == ctime:  # ctime ticks at the filesystem's granularity
        _write(p, b"b" * 100)
    assert manifest.content_digest(str(p), cache=cache)[str(p)] != before


def test_recently_modified_file_is_hashed_but_not_cached(tmp_path, reads) -> None:
    p, cache = tmp_path / "a.json", str(tmp_path / "c.json")
    p.write_bytes(b"fresh")  # mtime = now: a same-size rewrite in this tick would look unchanged
    manifest.content_digest(str(p), cache=cache)
    manifest.content_digest(str(p), cache=cache)
    assert reads == [str(p)] * 2 and not storage.exists(cache)


def test_unreadable_cache_means_hashing_again(tmp_path, reads) -> None:
    p, cache = tmp_path / "a.json", tmp_path / "c.json"
    _write(p, b"abc")
    cache.write_text("not json")
    want = hashlib.sha256(b"abc").hexdigest()[:16]
    assert manifest.content_digest(str(p), cache=str(cache)) == {str(p): want}
    assert reads == [str(p)]


def test_stage_fingerprints_use_the_runs_cache(tmp_path, reads) -> None:
    from dataclasses import replace

    from exits.config import load_config
    from exits.pipeline.runner import stage_fingerprints

    p = tmp_path / "a.json"
    _write(p, b"{}")
    cfg = load_config("demo")
    cfg = replace(cfg, data=replace(cfg.data, annotations=str(p), val_annotations=""))
    run = str(tmp_path / "run")
    first = stage_fingerprints(cfg, run)
    assert stage_fingerprints(cfg, run) == first and reads == [str(p)]
    _write(p, b"[]", OLD_NS + 5)
    assert stage_fingerprints(cfg, run)["prepare"] != first["prepare"]


@pytest.mark.integration
def test_s3_digest_is_etag_and_size_without_reading(s3_bucket, reads) -> None:
    uri = f"{s3_bucket}/ann.json"
    storage.write_bytes(uri, b"a" * 64)
    first = manifest.content_digest(uri)[uri]
    assert manifest.content_digest(uri)[uri] == first and reads == []
    storage.write_bytes(uri, b"b" * 64)  # same size, new content: a new ETag
    assert manifest.content_digest(uri)[uri] != first
    storage.write_bytes(uri, b"b" * 65)
    assert len({first, manifest.content_digest(uri)[uri]}) == 2 and reads == []
