"""Stage 2's console lines: mmengine iteration lines condensed and throttled."""

from __future__ import annotations

import logging

from exits.stage2.logs import IterationLines, condense

MMENGINE_ITER = (
    "Iter(train) [120/300]  base_lr: 1.0000e-02 lr: 1.0000e-02  eta: 0:04:13  time: 1.4096  "
    "data_time: 0.0226  memory: 0  loss: 1.2041  loss_rpn_cls: 0.0912  loss_mask: 0.3010"
)


def test_condense_iteration_line():
    assert condense(MMENGINE_ITER) == "2   iter 120/300  loss 1.204  1.41 s/iter  ETA 4m13s"
    assert condense("Config:\nmodel = dict(type='MaskRCNN', ...)") is None
    assert condense("Iter(val) [10/24]    eta: 0:00:03") is None
    assert "ETA 26h00m" in condense("Iter(train) [1/9]  eta: 1 day, 2:00:00  loss: 1.0")


def test_handler_throttles_but_keeps_the_last_iteration():
    lines: list[str] = []
    now = [0.0]
    handler = IterationLines(interval_s=10, sink=lines.append, clock=lambda: now[0])
    logger = logging.getLogger("test-mmengine")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for i in range(5, 301, 5):
            now[0] += 1.0
            logger.info(f"Iter(train) [{i}/300]  eta: 0:01:00  time: 1.0  loss: 0.5")
        logger.info("Config: a long dump")
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 7  # iterations 5, 55, ..., 255 (every 10 s), and 300
    assert lines[0].startswith("2   iter 5/300") and lines[-1].startswith("2   iter 300/300")
