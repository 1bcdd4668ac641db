"""storage.py against the local filesystem and a real moto S3 server on 127.0.0.1."""

import os

import pytest

from exits import storage
from exits.data.coco import read_table, write_table
from exits.data.prepare import load_instances

pytestmark = pytest.mark.integration


def _roundtrip(base: str):
    uri = storage.join(base, "a", "b.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    assert storage.exists(uri) and storage.read_text(uri) == "hello"
    storage.write_json(storage.join(base, "a", "m.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(base, "a", "m.json")) == {"k": [1, 2]}
    names = [os.path.basename(u) for u in storage.list_dir(storage.join(base, "a"))]
    assert names == ["b.txt", "m.json"]
    storage.publish_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"
    assert storage.list_dir(storage.join(base, "nope")) == []


def test_local(tmp_path):
    _roundtrip(str(tmp_path))


def test_local_publish_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "x.json")
    for i in range(3):
        storage.write_json(uri, {"i": i})
    assert os.listdir(tmp_path) == ["x.json"]


def test_s3(s3_bucket):
    _roundtrip(s3_bucket + "/run")


def test_s3_dataset_load_and_parquet(s3_bucket, demo_dataset):
    storage.upload_dir(
        os.path.dirname(demo_dataset["annotations"]), s3_bucket + "/demo/annotations"
    )
    storage.upload_dir(demo_dataset["images"], s3_bucket + "/demo/images")
    inst, err = load_instances(
        s3_bucket + "/demo/annotations/instances_train.json", s3_bucket + "/demo/images"
    )
    local, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    assert err.num_rows == 0 and inst.equals(local)
    write_table(inst, s3_bucket + "/run/prepare/instances.parquet")
    assert read_table(s3_bucket + "/run/prepare/instances.parquet").equals(inst)


def test_s3_missing_image_is_an_error_row(s3_bucket, demo_dataset):
    storage.upload_dir(os.path.dirname(demo_dataset["annotations"]), s3_bucket + "/d/annotations")
    inst, err = load_instances(
        s3_bucket + "/d/annotations/instances_train.json", s3_bucket + "/d/images"
    )
    assert inst.num_rows == 0 and err.num_rows == demo_dataset["num_instances"]["train"]
    assert all("missing image file" in r for r in err["reason"].to_pylist())


def test_endpoint_from_config_overrides_env(monkeypatch, moto_server, s3_bucket):
    """configure_s3(endpoint=...) wins over EXITS_S3_ENDPOINT (here pointing at a dead port)."""
    monkeypatch.setenv(storage.ENDPOINT_ENV, "http://127.0.0.1:9")
    with pytest.raises(OSError):
        storage.write_text(s3_bucket + "/k.txt", "x")
    storage.configure_s3(endpoint=moto_server)
    try:
        storage.write_text(s3_bucket + "/k.txt", "x")
        assert storage.read_text(s3_bucket + "/k.txt") == "x"
    finally:
        storage.configure_s3()
