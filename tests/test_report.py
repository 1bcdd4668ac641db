"""The run report: a fake run directory with some stages done, one missing, tiny synthetic data."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from exits import storage
from exits.config import CropConfig, RetrievalConfig
from exits.data.coco import ERROR_SCHEMA, write_table
from exits.data.prepare import load_instances
from exits.data.synthetic import write_demo_dataset
from exits.evaluate.weakest import write_weakest_masks
from exits.label import MASK_SCHEMA
from exits.pipeline.eval import write_retrieval_examples
from exits.report import write_report

RETRIEVAL = {"fg_precision": 0.8123, "fg_recall": 0.4567, "bg_precision": 0.9321,
             "bg_recall": 0.6543, "auc": 0.8877, "fg_per_crop": 5.5, "bg_per_crop": 7.25}  # fmt: skip
PSEUDO = {"all": {"miou": 0.7311, "count": 10}, "separated": {"miou": 0.5122, "count": 2},
          "small": {"miou": 0.6011, "count": 3}, "medium": {"miou": 0.7522, "count": 7},
          "large": {"miou": float("nan"), "count": 0}, "missing": 0, "extra": 0}  # fmt: skip
LABEL_SUMMARY = {"instances": 11, "masks": 10, "errors": 1, "prepare_errors": 1,
                 "empty_masks": 0, "crops": 10, "crops_per_s": 37.5, "seconds": 0.27}  # fmt: skip


def _manifest(run: str, stage: str, **fields) -> None:
    now = time.time()
    m = {"stage": stage, "status": "done", "fingerprint": f"fp-{stage}", "started": now - 3.0,
         "finished": now, "seconds": 3.0, **fields}  # fmt: skip
    storage.write_json(storage.join(run, stage, "manifest.json"), m)


def _png(h: int = 40, w: int = 60) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (0, 128, 255)
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("report")
    data = write_demo_dataset(str(tmp / "data"), num_images=4, image_size=96, seed=0)
    run = str(tmp / "run")
    inst, err = load_instances(data["annotations"], data["images"])
    vinst, _ = load_instances(data["val_annotations"], data["images"])
    assert inst.num_rows > 0 and vinst.num_rows > 0
    write_table(inst, storage.join(run, "prepare", "instances.parquet"))
    write_table(vinst, storage.join(run, "prepare", "val_instances.parquet"))
    errors = pa.Table.from_pylist(
        [
            {
                "ann_id": 999,
                "image_id": 77,
                "stage": "prepare",
                "reason": "corrupt image: <bad> & truncated",
            }
        ],
        schema=ERROR_SCHEMA,
    )
    write_table(err if err.num_rows else errors, storage.join(run, "prepare", "errors.parquet"))
    paths = {"annotations": data["annotations"], "images": data["images"],
             "val_annotations": data["val_annotations"], "val_images": data["images"]}  # fmt: skip
    counts = {"instances": inst.num_rows, "errors": 1, "val_instances": vinst.num_rows}
    _manifest(run, "prepare", data=paths, counts=counts)

    metrics = {
        "retrieval_attention": RETRIEVAL,
        "retrieval_bilateral": {**RETRIEVAL, "auc": 0.7001},
    }
    _manifest(run, "warmup", steps=20, final_loss=0.4321, samples_per_s=12.5, metrics=metrics)
    storage.publish_bytes(storage.join(run, "warmup", "loss.png"), _png())
    _manifest(run, "generator", steps=30, final_loss=0.3, samples_per_s=11.0,
              metrics={"pseudo_label": PSEUDO})  # fmt: skip
    # no generator/loss.png: the report re-plots metrics.csv
    storage.write_text(
        storage.join(run, "generator", "metrics.csv"),
        "step,loss,loss_point,lr\n1,0.9,0.5,0.001\n2,0.7,0.4,0.001\n3,0.5,0.3,0.001\n",
    )

    # label: masks from the GT (one instance dropped -> shown as "without a pseudo mask")
    rows = inst.to_pylist()
    masks = [{"ann_id": r["ann_id"], "image_id": r["image_id"], "category_id": r["category_id"],
              "bbox": r["bbox"], "score": round(0.9 - 0.01 * k, 2), "segmentation": r["gt_segmentation"],
              "area": r["area"], "generator": "abc123", "supervision": r["supervision"]}
             for k, r in enumerate(rows[1:])]  # fmt: skip
    write_table(
        pa.Table.from_pylist(masks, schema=MASK_SCHEMA),
        storage.join(run, "label", "masks", "shard-00000.parquet"),
    )
    label_err = pa.Table.from_pylist(
        [{"ann_id": rows[0]["ann_id"], "image_id": rows[0]["image_id"], "stage": "label",
          "reason": "degenerate extreme points: top == bottom"}], schema=ERROR_SCHEMA)  # fmt: skip
    write_table(label_err, storage.join(run, "label", "errors", "shard-00000.parquet"))
    write_table(errors, storage.join(run, "label", "errors", "prepare.parquet"))
    _manifest(run, "label", summary=LABEL_SUMMARY, config={"min_score": 0.25},
              export={"annotations": len(masks) - 3, "below_min_score": 3})  # fmt: skip
    write_weakest_masks(run, k=5)  # what the eval stage saves for the weakest-masks section

    # stage2: missing; eval: folder without manifest (e.g. the report is written during eval)
    storage.write_json(storage.join(run, "eval", "metrics.json"),
                       {"dataset": "demo", "pseudo_label_miou": {**PSEUDO, "all": {"miou": 0.6789, "count": 10}},
                        "pseudo_label_miou_box": {**PSEUDO, "all": {"miou": 0.5432, "count": 10}}})  # fmt: skip
    cfg = {"retrieval": {"similarity": "bilateral", "threshold_rule": "relative", "delta": 1.0},
           "crop": {"size": 96, "inference_enlarge": 1.3}, "data": {"name": "demo"}}  # fmt: skip
    storage.write_json(storage.join(run, "config.json"), cfg)
    # the retrieval figure's inputs, as the eval stage saves them (no warmup model: grid S / 8)
    rc = RetrievalConfig(similarity="bilateral", threshold_rule="relative", delta=1.0)
    write_retrieval_examples(run, rc, CropConfig(size=96, inference_enlarge=1.3))
    return run


def _stage_status(page: str, stage: str) -> str:
    m = re.search(rf"<tr><td>{stage}</td><td[^>]*>([^<]*)</td>", page)
    assert m, f"no status row for {stage}"
    return m.group(1)


def test_report_full(run_dir: str) -> None:
    uri = write_report(run_dir, max_overlays=3)
    assert uri == os.path.join(run_dir, "report", "index.html")
    assert os.path.exists(uri)
    page = open(uri, encoding="utf-8").read()
    assert "<script" not in page

    for stage in ("prepare", "warmup", "generator", "label", "stage2", "eval"):
        assert f"<td>{stage}</td>" in page
    assert _stage_status(page, "prepare") == "done"
    assert _stage_status(page, "stage2") == "not run"
    assert _stage_status(page, "eval") == "incomplete"

    for number in ("0.8123", "0.4567", "0.9321", "0.6543", "0.8877", "0.7001",  # retrieval
                   "0.7311", "0.5122", "0.6011", "0.7522", "0.6789",  # mIoU
                   "37.5", "0.4321"):  # fmt: skip
        assert number in page, number
    assert "attention" in page and "bilateral" in page
    assert "not run (no stage-2 metrics)" in page

    # errors: escaped, counted by reason
    assert "corrupt image: &lt;bad&gt; &amp; truncated" in page
    assert "<bad>" not in page
    assert "degenerate extreme points" in page

    report = os.path.join(run_dir, "report")
    srcs = re.findall(r'<img src="([^"]+)"', page)
    overlays = [s for s in srcs if s.startswith("overlay_")]
    assert 1 <= len(overlays) <= 3
    assert {"loss_warmup.png", "loss_generator.png", "retrieval.png"} <= set(srcs)
    for name in srcs:
        img = cv2.imread(os.path.join(report, name))
        assert img is not None, name
    # side-by-side overlays: GT and pseudo panels, upscaled from 96 px
    ov = cv2.imread(os.path.join(report, overlays[0]))
    assert ov.shape[1] > 2 * ov.shape[0] - 60 and ov.shape[0] >= 256
    assert "figure unavailable" not in page


def test_report_empty_run(tmp_path) -> None:
    run = str(tmp_path / "empty")
    uri = write_report(run)
    page = open(uri, encoding="utf-8").read()
    for stage in ("prepare", "warmup", "generator", "label", "stage2", "eval"):
        assert _stage_status(page, stage) == "not run"
    assert "figure unavailable" in page  # loss curves, overlays, retrieval


def test_report_figure_failure_is_contained(run_dir: str, tmp_path) -> None:
    """Broken inputs of one figure show 'figure unavailable: reason', the rest still renders."""
    run = str(tmp_path / "broken")
    for stage in ("prepare", "label"):
        for f in storage.list_dir(storage.join(run_dir, stage), recursive=True):
            if os.path.isfile(f):
                rel = os.path.relpath(f, run_dir)
                storage.write_bytes(storage.join(run, rel), storage.read_bytes(f))
    m = storage.read_json(storage.join(run, "prepare", "manifest.json"))
    m["data"]["images"] = str(tmp_path / "no-such-images")
    storage.write_json(storage.join(run, "prepare", "manifest.json"), m)
    storage.write_json(storage.join(run, "config.json"), {"retrieval": {"similarity": "attention"}})

    page = open(write_report(run, max_overlays=2), encoding="utf-8").read()
    assert "figure unavailable: image" in page and "missing image file" in page
    assert "retrieval_examples.json missing (the eval stage has not run)" in page
    # attention retrieval without the extractor: eval records why, the report shows it
    storage.write_json(storage.join(run, "eval", "retrieval_examples.json"),
                       {"unavailable": "ValueError: needs the warmup extractor (warmup/model.pt missing)"})  # fmt: skip
    page = open(write_report(run, max_overlays=2), encoding="utf-8").read()
    assert "figure unavailable: ValueError: ValueError: needs the warmup extractor" in page
    assert _stage_status(page, "label") == "done"
    assert "37.5" in page


def _section(page: str, title: str) -> str:
    """The HTML from heading ``title`` to the next heading."""
    m = re.search(rf"<h[23]>{re.escape(title)}</h[23]>(.*?)(?=<h[23]>|</body>)", page, re.S)
    assert m, f"no section {title!r}"
    return m.group(1)


def _rows(table_html: str) -> list[list[str]]:
    return [
        re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", tr)
        for tr in re.findall(r"<tr>(.*?)</tr>", table_html)
    ]


def test_report_shows_a_finishing_stage_as_done(run_dir: str, tmp_path) -> None:
    """The eval stage draws the page before publishing its manifest and passes its own status."""
    now = time.time()
    own = {"stage": "eval", "status": "done", "started": now - 2.0, "finished": now,
           "seconds": 2.0, "report": True}  # fmt: skip
    run = str(tmp_path / "run")
    for f in storage.list_dir(run_dir, recursive=True):
        if os.path.isfile(f) and "/report/" not in f:
            storage.write_bytes(
                storage.join(run, os.path.relpath(f, run_dir)), storage.read_bytes(f)
            )
    page = open(write_report(run, max_overlays=0, pending={"eval": own}), encoding="utf-8").read()
    assert _stage_status(page, "eval") == "done"
    assert _stage_status(page, "stage2") == "not run"


def test_miou_table_has_a_box_baseline_row_under_each_set(run_dir: str) -> None:
    page = open(write_report(run_dir, max_overlays=0), encoding="utf-8").read()
    rows = _rows(_section(page, "Pseudo-label mIoU"))
    names = [r[0] for r in rows[1:]]
    assert names == ["held-out val (stage 1b generator)", "↳ box as mask (baseline)",
                     "train pseudo labels (stage 1c)", "↳ box as mask (baseline)"]  # fmt: skip
    assert rows[0][1] == "mIoU all"
    assert rows[3][1] == "0.6789" and rows[4][1] == "0.5432"
    assert rows[2][1] == "–"  # the held-out baseline was not computed in this run: shown empty


def test_ap_table_shows_only_ap_figures(tmp_path) -> None:
    run = str(tmp_path / "run")
    s2 = {"coco/segm_mAP": 0.1234, "coco/segm_mAP_50": 0.3456, "coco/bbox_mAP": 0.2345,
          "iter": 40, "epoch": 2, "start_iter": 0, "train/lr": 0.02, "coco/segm_mAP_copypaste": "x"}  # fmt: skip
    _manifest(run, "stage2", metrics=s2)
    page = open(write_report(run, max_overlays=0), encoding="utf-8").read()
    rows = _rows(_section(page, "Mask AP (stage 2)"))
    assert [r[0] for r in rows[1:]] == ["coco/segm_mAP", "coco/segm_mAP_50", "coco/bbox_mAP"]
    keys = re.search(r"<td>stage2</td>.*?</tr>", page, re.S).group(0)
    assert "iter" not in keys and "lr" not in keys and "segm_mAP=0.1234" in keys


def test_retrieval_examples_need_the_extractor_for_attention(run_dir: str, tmp_path) -> None:
    with pytest.raises(ValueError, match="warmup/model.pt missing"):
        write_retrieval_examples(run_dir, RetrievalConfig(similarity="attention"), CropConfig())


def test_report_runs_no_model(run_dir: str) -> None:
    """The retrieval figure is drawn from eval's saved arrays: exits/report imports no torch,
    no method and no model code, and the captions carry eval's ann ids and precisions."""
    import ast

    import exits.report

    mods: set[str] = set()
    for path in Path(exits.report.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {
        m
        for m in mods
        if m.split(".")[0] == "torch"
        or m.startswith(("exits.method", "exits.model", "exits.checkpoints"))
    }
    meta = storage.read_json(storage.join(run_dir, "eval", "retrieval_examples.json"))
    page = open(write_report(run_dir, max_overlays=3), encoding="utf-8").read()
    assert 'src="retrieval.png"' in page and "similarity <b>bilateral</b>" in page
    assert f"ann {meta['ann_ids'][0]}: FG" in page


def test_template_escapes_run_strings(tmp_path) -> None:
    run = str(tmp_path / 'run<"&>')
    _manifest(run, "stage2", status="failed", error='<script>alert("x")</script> & more')
    page = open(write_report(run, max_overlays=0), encoding="utf-8").read()
    assert "<script" not in page
    assert "error: &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; more" in page
    assert "run&lt;&#34;&amp;&gt;" in page  # the run URI in the page header
    assert _stage_status(page, "stage2") == "failed"


def test_weakest_masks_section(run_dir: str) -> None:
    """Eval's five lowest-score masks drawn as tiles, their ids/scores/IoU in a table, the
    score histogram, and how many masks label.min_score left out of stage 2's json."""
    saved = storage.read_json(storage.join(run_dir, "eval", "weakest_masks.json"))
    page = open(write_report(run_dir, max_overlays=0), encoding="utf-8").read()
    section = _section(page, "Weakest masks (lowest quality score)")
    assert 'src="weakest_masks.png"' in section and 'src="score_histogram.png"' in section
    assert "3 below label.min_score 0.25 were left out of stage 2" in section
    rows = _rows(section)
    assert rows[0] == ["rank", "ann_id", "image_id", "score", "IoU"]
    want = sorted(saved["weakest"], key=lambda e: e["score"])
    assert [int(r[1]) for r in rows[1:]] == [e["ann_id"] for e in want]
    assert [r[3] for r in rows[1:]] == [f"{e['score']:.4g}" for e in want]
    assert all(r[4] == "1" for r in rows[1:])  # the fixture's masks are the GT masks
    tiles = cv2.imread(os.path.join(run_dir, "report", "weakest_masks.png"))
    assert tiles.shape[0] >= 160 and tiles.shape[1] >= 5 * 160  # one row of 5 (6 columns)
    assert cv2.imread(os.path.join(run_dir, "report", "score_histogram.png")) is not None
