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


def _stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Stop only this test's Ray processes (``ray stop`` would stop every Ray on the machine):
    those whose command line names our temp dir or our GCS address, and all their descendants
    (agents rename their command line)."""
    parents: dict[int, int] = {}
    ours: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
                if temp_dir.encode() in cmdline or f":{gcs_port}\0".encode() in cmdline:
                    ours.add(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    grew = True
    while grew:
        children = {p for p, pp in parents.items() if pp in ours} - ours
        grew = bool(children)
        ours |= children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
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
         "--object-store-memory=300000000", "--disable-usage-stats",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        check=True, env=env, capture_output=True, timeout=180,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address, env, tmp
    finally:
        _stop_cluster(temp_dir, port)


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
    for _ in range(30):  # right after `ray start` the head's job agent may not be up yet
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in out.stderr + out.stdout:
            break
        time.sleep(2)
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
    # Ray Train V2 resumes from what its checkpoint manager snapshot records: wait until the
    # snapshot names a checkpoint (a checkpoint_* folder alone may not be registered yet)
    snapshot = os.path.join(output, "generator", "ray", "train", "checkpoint_manager_snapshot.json")
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with open(snapshot) as f:
                if json.load(f).get("latest_checkpoint_result"):
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    else:
        pytest.fail("stage 1b never registered a checkpoint")
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
    # the job log reads like the local console: stages and progress lines, not Ray's noise
    assert "stage generator: running" in stdout and "1b  " in stdout and "1c  done" in stdout
    for noise in ("TrainingReport", "PlacementGroupCleaner", "core_worker.cc"):
        assert noise not in stdout, noise
