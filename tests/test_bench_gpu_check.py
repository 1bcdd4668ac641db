"""bench/gpu_check.sh --dry-run: every section of the GPU check runs on CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_gpu_check_dry_run_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    sections = result["sections"]
    assert set(sections) == {"model_vit_small_dinov2_224", "model_vit_base_mae_512", "label",
                             "train_1b"}  # fmt: skip
    for name, sec in sections.items():
        assert "error" not in sec and "skipped" not in sec, (name, sec)
    for name in ("model_vit_small_dinov2_224", "model_vit_base_mae_512"):
        assert sections[name]["crops_per_s"] > 0 and sections[name]["gflop_per_crop"] > 0
    assert sections["label"]["crops"] > 0
    assert sections["train_1b"]["steps"] == 3 and sections["train_1b"]["step_s_median"] > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
