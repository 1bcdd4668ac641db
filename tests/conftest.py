"""Shared fixtures and markers (slow / integration run by `make test` too)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_COCO = os.path.join(REPO, "..", "shared", "data", "coco_train128")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "integration: starts real services (Ray head, moto S3)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def load_script():
    """``load_script("jobs/pseudo_label.py")``: a repository script imported as a module."""
    import importlib.util

    def load(relpath: str):
        name = os.path.splitext(relpath)[0].replace("/", "_")
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small synthetic demo set (16 images, 96 px) shared by the test session."""
    from exits.data.synthetic import write_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    return write_demo_dataset(str(out), num_images=16, image_size=96, seed=0)


@pytest.fixture(scope="module")
def ray_local():
    """A small local Ray (2 CPUs, 200 MB object store) for one test module; stops only itself."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_generator_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised vit_tiny_demo generator checkpoint (96² crops, seed 0)."""
    import torch

    from exits.checkpoints import save_model
    from exits.model.generator import build_generator

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "generator.pt")
    save_model(
        path, build_generator("vit_tiny_demo"), "vit_tiny_demo", "generator", {"img_size": 96}
    )
    return path


@pytest.fixture(scope="session")
def coco128() -> str:
    if not os.path.exists(os.path.join(SHARED_COCO, "instances_train2017.json")):
        pytest.skip("shared/data/coco_train128 not present")
    return SHARED_COCO


@pytest.fixture(scope="module")
def moto_server():
    """A real moto S3 server on 127.0.0.1 (module scope); yields the endpoint URL."""
    pytest.importorskip("moto")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "EXITS_S3_ENDPOINT": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(moto_server: str) -> str:
    """A fresh bucket on the moto server; yields ``s3://<bucket>``."""
    import uuid

    import boto3

    name = f"exits-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
