"""Progress lines (exits.progress) and the quiet console's routing (exits.console)."""

from __future__ import annotations

import logging
import re

from exits.console import setup_logging
from exits.progress import Progress, format_duration

LINE_1B = re.compile(
    r"^1b  epoch \d+/\d+  step \d+/\d+  loss [\d.]+  [\d.]+ steps/s  ETA (\d+h)?(\d+m)?\d+s$"
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_format_duration():
    assert [format_duration(s) for s in (0, 45.4, 460, 7500)] == ["0s", "45s", "7m40s", "2h05m"]


def test_progress_line_rate_eta_and_throttle():
    clock = FakeClock()
    p = Progress("1b", 1800, interval_s=10, clock=clock)
    clock.t += 5
    assert p.update(10) is None  # not due yet
    clock.t += 135  # 420 steps in 140 s: 3 steps/s, 1380 left: 460 s
    line = p.update(420, {"epoch": "7/30"}, {"loss": 0.2141})
    assert line == "1b  epoch 7/30  step 420/1800  loss 0.214  3.00 steps/s  ETA 7m40s"
    assert LINE_1B.match(line)
    assert p.update(421) is None  # throttled again
    clock.t += 460
    p.update(1800)
    assert (
        p.summary({"loss": 0.2}) == "1b  done  step 1800/1800  loss 0.200  3.00 steps/s  in 10m00s"
    )


def test_progress_resumed_run_times_only_new_steps():
    clock = FakeClock()
    p = Progress("1c", 1000, unit="rows", rate_unit="crops/s", start=500, interval_s=0, clock=clock)
    clock.t += 10
    assert p.update(600) == "1c  rows 600/1000  10.00 crops/s  ETA 40s"


def test_quiet_console_routes_ray_noise_to_the_file(tmp_path, capsys):
    log_file = tmp_path / "logs" / "driver.log"
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    ray_logger = logging.getLogger("ray")
    ray_before = [(h, h.level) for h in ray_logger.handlers]
    try:
        setup_logging(verbose=False, log_file=str(log_file))
        logging.getLogger("exits.progress").info("1b  epoch 1/2  step 1/4")
        logging.getLogger("ray.train").info("Reporting training result 1: TrainingReport(x)")
        logging.getLogger("ray").warning("Token authentication is enabled")
        logging.getLogger("ray.data").info("Execution plan of Dataset")
        logging.getLogger("exits.label").error("a real problem")
        for h in root.handlers + ray_logger.handlers + logging.getLogger("ray.data").handlers:
            h.flush()
        console = capsys.readouterr()
        text = log_file.read_text()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in before[0]:
            root.addHandler(h)
        root.setLevel(before[1])
        for lg in (ray_logger, logging.getLogger("ray.data")):
            for h in list(lg.handlers):
                if isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
        for h, level in ray_before:
            h.setLevel(level)
    shown = console.out + console.err
    assert "1b  epoch 1/2  step 1/4" in console.out
    assert "a real problem" in console.out
    for noise in ("TrainingReport", "Token authentication", "Execution plan"):
        assert noise not in shown, noise
        assert noise in text, noise
