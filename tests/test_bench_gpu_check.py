"""bench/gpu_check.sh --dry-run as on the bare GPU image (Ray, mmcv, mmdet, mmengine not
importable): the sections model, train_1b and quality run on CPU at tiny sizes (or say why
not), the Ray section says why it was skipped; the carried-weights packing round-trips."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

HIDDEN = ("ray", "mmcv", "mmdet", "mmengine")
# a meta-path finder that refuses the packages the bare GPU image lacks, in every process that
# the check starts (sitecustomize runs at interpreter start-up, from PYTHONPATH)
SITECUSTOMIZE = f"""
import sys

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden)", name=name)
        return None

sys.meta_path.insert(0, _Hide())
"""


def test_hidden_modules_do_not_import(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = "import importlib\nfor m in ('ray', 'mmengine', 'torch'):\n" \
           "    try:\n        importlib.import_module(m); print(m, 'ok')\n" \
           "    except ImportError:\n        print(m, 'hidden')"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split("\n")[:3] == ["ray hidden", "mmengine hidden", "torch ok"], out.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_check_dry_run_without_ray(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(hide), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
    assert result["dry_run"] and result["device"] == "cpu"
    assert not any(result["importable"][m] for m in HIDDEN)
    sections = result["sections"]
    assert {"model", "train_1b", "quality"} <= set(sections)
    for name, sec in sections.items():
        assert "error" not in sec, (name, sec)
    # Ray's section: skipped, and why
    assert "ray" in sections["label"]["skipped"]
    # model: both generators at tiny crops, a rate and a FLOP count
    model = sections["model"]
    assert {k: v["crop_size"] for k, v in model.items() if k != "section_s"} == {
        "vit_small_dinov2_224": 56, "vit_base_mae_512": 64}  # fmt: skip
    assert all(v["crops_per_s"] > 0 and v["gflop_per_crop"] > 0
               for k, v in model.items() if k != "section_s")  # fmt: skip
    # train_1b: 3 steps of 2 crops at 56², the whole encoder trainable
    t1b = sections["train_1b"]
    assert (t1b["steps"], t1b["batch"], t1b["crop_size"], t1b["trainable_blocks"]) == (3, 2, 56, -1)
    assert t1b["step_s_median"] > 0 and t1b["warmup_1a"]["steps"] == 2
    # quality: frozen and fine-tuned runs of 2 steps each, both evaluated on the held-out part
    q = sections["quality"]
    assert q["crop_size"] == 56 and q["val_instances"] == 4
    for arm in ("frozen", "finetuned"):
        assert q[arm]["steps"] == 2 and q[arm]["miou"]["count"] == 4, (arm, q[arm])
        assert 0.0 <= q[arm]["miou"]["all"] <= 1.0
    assert q["finetuned"]["encoder_lr"] < q["finetuned"]["decoder_lr"]
    assert q["delta"]["all"] == pytest.approx(
        q["finetuned"]["miou"]["all"] - q["frozen"]["miou"]["all"], abs=1e-3
    )


@pytest.fixture(scope="module")
def gpu_check(load_script):
    return load_script("bench/gpu_check.py")


def test_carried_weights_round_trip_at_fp16(gpu_check, tmp_path):
    """pack (fp16, gzip) -> unpack (float32): each value is its fp16 rounding, which is within
    2^-11 relative of it for normal numbers; integer tensors pass unchanged."""
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 32, generator=g) * 3, "b": torch.tensor([1.0, -2.5e-3, 7.0]),
             "n": torch.tensor([3, 4])}  # fmt: skip
    src, packed, back = tmp_path / "s.pt", tmp_path / "s.fp16.pt.gz", tmp_path / "back.pt"
    torch.save(state, src)
    gpu_check.pack_weights(str(src), str(packed))
    got = torch.load(gpu_check.unpack_weights(str(packed), str(back)), weights_only=True)
    assert set(got) == set(state) and got["w"].dtype == torch.float32
    assert torch.equal(got["w"], state["w"].half().float()) and torch.equal(got["n"], state["n"])
    rel = ((got["w"] - state["w"]).abs() / state["w"].abs()).max()
    assert rel <= 2**-11
    assert got["b"][1].item() == pytest.approx(-2.5e-3, rel=2**-11)


def test_one_device_keeps_the_step_and_json_is_strict(gpu_check):
    """2 workers x 8 crops -> 1 worker x 16 (the profile's step on one device); NaN -> null."""
    from exits.config import TrainConfig

    tc = gpu_check.one_device(TrainConfig(batch_size=8, num_workers=2), torch.device("cpu"))
    assert (tc.batch_size, tc.num_workers, tc.use_gpu) == (16, 1, False)
    tc = gpu_check.one_device(TrainConfig(batch_size=8, num_workers=2), torch.device("cpu"),
                              batch_size=2)  # fmt: skip
    assert tc.batch_size == 2
    assert gpu_check.strict_json({"a": [math.nan, 1.0], "b": {"c": math.inf}}) == {
        "a": [None, 1.0], "b": {"c": None}}  # fmt: skip
