"""What a user sees: `jobs/pipeline.py` on the quick demo prints stages and progress lines with
ETA, and Ray's own noise lands in the run's log files instead of the console."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NOISE = ("TrainingReport", "PlacementGroupCleaner", "core_worker.cc", "Token authentication",
         "Started a local Ray instance")  # fmt: skip
LINE_1B = re.compile(r"1b  epoch \d+/\d+  step \d+/\d+  loss [\d.]+  [\d.]+ steps/s  ETA \S+")


def test_quiet_console_shows_stages_and_progress(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, EXITS_PROGRESS_EVERY_S="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # 1b needs no 1a here: the demo's similarity source (bilateral) uses no extractor
    proc = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--dataset", "demo", "--quick", "--output", str(out),
         "--stages", "prepare", "generator", "label", "--num-cpus", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "stage generator: running" in console and "stage label: finished in" in console
    assert LINE_1B.search(console), console
    assert re.search(r"1b  done  step 4/4  loss [\d.]+  [\d.]+ steps/s  in \S+", console)
    assert re.search(r"1c  done  rows \d+/\d+  [\d.]+ crops/s", console)
    for noise in NOISE:
        assert noise not in console, noise
    logs = out / "logs"
    assert (logs / "driver.log").exists()
    worker_logs = "".join(open(p, errors="replace").read() for p in glob.glob(f"{logs}/ray/*"))
    assert "TrainingReport" in worker_logs  # Ray Train's per-report dump: in the files only
    assert "PlacementGroupCleaner" in worker_logs
