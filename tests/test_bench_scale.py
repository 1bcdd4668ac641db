"""bench/scale.py --stages all: its pure parts (JSON assembly, goal verdict, the run's config)
with hand-computed numbers. The bench itself runs minutes to an hour, not in tests."""

from __future__ import annotations

import math

import pytest
import yaml

from exits.config import load_config


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench/scale.py")


def _row(wall: float, driver: float, worker: float, imports: float) -> dict:
    return {"wall_s": wall, "driver_peak_rss_gb": driver, "worker_peak_rss_gb": worker,
            "import_rss_gb": imports, "worker_import_rss_gb": imports / 2, "process_s": wall + 9}  # fmt: skip


SIZES = [2000, 20000]
RUNS = [
    {
        "prepare": _row(2.0, 0.100, 0.20, 0.50),
        "export": _row(0.5, 0.0, 0.0, 0.40),
        "label": _row(100.0, 0.30, 0.60, 0.70),
    },  # fmt: skip
    {"prepare": _row(10.0, 0.105, 0.30, 0.52), "export": _row(4.0, 0.0, 0.0, 0.41)},
]


def test_assemble_orders_sizes_and_rates(bench) -> None:
    out = bench.assemble(SIZES, RUNS)
    assert out["sizes"] == [2000, 20000]
    assert list(out["stages"]) == ["prepare", "export"]  # report order; label missing at 20 k
    p = out["stages"]["prepare"]
    assert p["wall_s"] == [2.0, 10.0]
    assert p["instances_per_s"] == [1000.0, 2000.0]  # 2000 / 2 s, 20000 / 10 s
    assert p["driver_peak_rss_gb"] == [0.100, 0.105]
    assert p["worker_peak_rss_gb"] == [0.20, 0.30]
    assert p["import_rss_gb"] == [0.50, 0.52]
    assert p["worker_import_rss_gb"] == [0.25, 0.26]
    assert out["stages"]["export"]["instances_per_s"] == [4000.0, 5000.0]


def test_growth_and_extrapolation(bench) -> None:
    assert bench.growth(0.2, 0.3) == pytest.approx(0.5)
    assert bench.growth(0.0, 0.0) == 0.0
    assert bench.growth(0.0, 0.01) == math.inf
    assert bench.extrapolate([10, 20], [1.0, 2.0], 40) == pytest.approx(4.0)
    assert bench.extrapolate([2000, 20000], [0.1, 0.1], 1_270_000) == pytest.approx(0.1)


def test_verdict_per_stage(bench) -> None:
    v = bench.verdict(bench.assemble(SIZES, RUNS))
    p = v["prepare"]
    # driver: 0.105 / 0.100 - 1 = 5 % growth; at 1.27 M: 0.100 + 0.005 * (1,268,000 / 18,000)
    # = 0.4522 GB, + the imports' 0.52 = 0.972 GB <= 4: met
    assert p["driver_growth"] == pytest.approx(0.05)
    assert p["driver_at_goal_gb"] == pytest.approx(0.972)
    assert p["driver_ok"]
    # workers: 0.30 / 0.20 - 1 = 50 % > 10 %; 0.20 + 0.10 * 70.44 + their imports' 0.26
    # = 7.504 GB > 4: missed
    assert p["worker_growth"] == pytest.approx(0.5)
    assert p["worker_at_goal_gb"] == pytest.approx(7.504)
    assert not p["worker_ok"]
    assert v["export"] == {"driver_growth": 0.0, "driver_at_goal_gb": 0.41, "driver_ok": True,
                           "worker_growth": 0.0, "worker_at_goal_gb": 0.205, "worker_ok": True}  # fmt: skip
    assert v["all_ok"] is False


def test_flat_growth_under_the_limit_but_too_big_at_lvis_fails(bench) -> None:
    # 9 % growth passes the ratio, but 1.0 -> 1.09 GB over 18 k instances is 0.005 GB per
    # 1,000: 1.0 + 0.09 * 70.44 + 0.5 = 7.84 GB at 1.27 M
    result = {"sizes": SIZES, "stages": {"label": {"driver_peak_rss_gb": [1.0, 1.09],
              "worker_peak_rss_gb": [0.0, 0.0], "import_rss_gb": [0.5, 0.5],
              "worker_import_rss_gb": [0.3, 0.3]}}}  # fmt: skip
    v = bench.verdict(result)
    assert v["label"]["driver_growth"] == pytest.approx(0.09)
    assert v["label"]["driver_at_goal_gb"] == pytest.approx(7.84)
    assert not v["label"]["driver_ok"] and not v["all_ok"]


def test_the_runs_config_is_a_valid_pipeline_config(bench, tmp_path) -> None:
    args = bench.parse_args(["--stages", "all"])
    assert args.sizes == "10000,100000"
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump(bench.dataset_yaml(str(tmp_path), args)))
    cfg = load_config(str(path))
    assert cfg.data.name == "lvis" and cfg.model.generator == "vit_tiny_demo"
    assert cfg.data.annotations == str(tmp_path / "lvis_train.json")
    assert (cfg.crop.size, cfg.warmup.max_steps, cfg.generator.max_steps) == (64, 3, 3)
    assert (cfg.stage2.max_iters, cfg.stage2.num_workers, cfg.label.num_actors) == (4, 1, 1)
    assert bench.scaled_sizes(0.25)[0] == (160, 120)  # LVIS's 640 x 480 / 4
    assert bench.scaled_sizes(0.01)[0] == (32, 32)


def test_sizes_are_checked(bench) -> None:
    with pytest.raises(SystemExit, match="--sizes"):
        bench.main_all_stages(bench.parse_args(["--stages", "all", "--sizes", "50,500"]))
    with pytest.raises(SystemExit, match="--sizes"):
        bench.main_all_stages(bench.parse_args(["--stages", "all", "--sizes", "1,2,3"]))
