"""bench/retention.py: argument validation (the bench itself runs ~30 min, not in tests)."""

from __future__ import annotations

import pytest

from exits.config import load_config
from exits.stage2.train_eval import batch_override


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench/retention.py")


def test_runs_are_validated(bench) -> None:
    s2 = load_config("demo").stage2
    assert bench.validate(bench.parse_args([]), s2) == ["exits", "box_only", "gt"]
    assert bench.validate(bench.parse_args(["--runs", "gt"]), s2) == ["gt"]
    with pytest.raises(ValueError, match="box-only"):
        bench.validate(bench.parse_args(["--runs", "exits,box-only"]), s2)


def test_workers_that_cannot_fit_fail_fast(bench) -> None:
    s2 = load_config("demo").stage2  # 1 worker x 2 CPUs
    assert (s2.num_workers, s2.cpus_per_worker, s2.batch_size) == (1, 2, 4)
    with pytest.raises(ValueError, match="needs 4 CPUs"):
        bench.validate(bench.parse_args(["--num-workers", "2"]), s2)
    bench.validate(bench.parse_args(["--num-workers", "2", "--num-cpus", "4"]), s2)


def test_stage2_batch_override() -> None:
    s2 = load_config("demo").stage2
    assert batch_override(s2) == {"train_dataloader.batch_size": 4}
    assert batch_override(load_config("coco").stage2) == {}  # the profile's (mmdet's) batch


def test_default_profile_is_what_make_demo_runs(bench) -> None:
    """Retention is quoted for the demo profile that ships: the one `make demo` runs."""
    import re
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t.*pipeline\.py --dataset (\S+)", makefile, re.M)
    assert demo is not None and demo.group(1) == bench.FULL_CONFIG
    assert bench.parse_args([]).profile == bench.FULL_CONFIG
    assert load_config(bench.FULL_CONFIG).stage2 == load_config("demo").stage2
