"""The user's entry point: `ray job submit` of jobs/pipeline.py against a real Ray head.

One test covers both must-shows: the job is stopped during stage 1b, re-submitted, and
finishes: every stage's manifest, metrics.json and report/index.html exist, stage 1a was not
redone (manifest timestamps) and stage 1b resumed from its Ray Train checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port

from exits.manifest import STAGES

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = os.path.dirname(sys.executable)


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (``ray stop`` would stop every Ray on the machine)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if temp_dir.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayhead")
    # loopback-only test cluster: no token auth (Ray 2.60 turns it on by default)
    env = dict(
        os.environ,
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
    )
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    temp_dir = f"/tmp/ray-exits-{port}"  # short: AF_UNIX socket paths are limited to 107 bytes
    subprocess.run(
        [f"{BIN}/ray", "start", "--head", "--num-cpus", "2", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp_dir}",
         "--object-store-memory=300000000", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address, env, tmp
    finally:
        _stop_cluster(temp_dir)


def _submit(address: str, env: dict, output: str, extra: list[str], wait: bool) -> str:
    cmd = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", REPO,
           "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", "demo_data", ".git"]})]  # fmt: skip
    if not wait:
        cmd.append("--no-wait")
    cmd += [
        "--",
        "python",
        "jobs/pipeline.py",
        "--dataset",
        "demo",
        "--quick",
        "--output",
        output,
        *extra,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def _job_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if "submitted successfully" in line and "'" in line:
            return line.split("'")[1]
    raise AssertionError(f"no job id in: {stdout}")


def _manifest(output: str, stage: str) -> dict | None:
    path = os.path.join(output, stage, "manifest.json")
    return json.load(open(path)) if os.path.exists(path) else None


def test_submit_kill_during_1b_resubmit_finishes(ray_head):
    address, env, tmp = ray_head
    output = str(tmp / "run")
    slow_1b = [
        "--set",
        "generator.epochs=100",
        "--set",
        "generator.max_steps=40",
        "--set",
        "generator.checkpoint_every=3",
    ]
    job = _job_id(_submit(address, env, output, slow_1b, wait=False))
    ckpts = os.path.join(output, "generator", "ray", "train")
    deadline = time.time() + 600
    while time.time() < deadline:
        done = (
            [d for d in os.listdir(ckpts) if d.startswith("checkpoint_")]
            if os.path.isdir(ckpts)
            else []
        )
        if done:
            break
        time.sleep(1)
    else:
        pytest.fail("stage 1b never wrote a checkpoint")
    subprocess.run(
        [f"{BIN}/ray", "job", "stop", "--address", address, job],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    warm_before = _manifest(output, "warmup")
    assert warm_before is not None and _manifest(output, "generator") is None

    stdout = _submit(address, env, output, slow_1b, wait=True)
    for stage in STAGES:
        m = _manifest(output, stage)
        assert m is not None and m["status"] == "done", stage
    warm_after = _manifest(output, "warmup")
    assert warm_after["finished"] == warm_before["finished"], "stage 1a was redone"
    gen = _manifest(output, "generator")
    assert gen["steps"] == 40
    assert gen["resumed_from_steps"] and gen["resumed_from_steps"][0] > 0, (
        "1b did not resume from its checkpoint"
    )
    metrics = json.load(open(os.path.join(output, "metrics.json")))
    assert 0.0 <= metrics["pseudo_label_miou"]["all"]["miou"] <= 1.0
    assert os.path.exists(os.path.join(output, "report", "index.html"))
    assert '"output"' in stdout
