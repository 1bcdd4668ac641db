"""Issue 26 items 4 and 5 (round 2), without Ray: YAML without alias expansion, `base:` loops,
short error messages; one JSON reader for every entry point (one BOM rule, duplicate keys and
deep nesting refused in one line); ``iscrowd`` a boolean or 0/1; checkpoints checked before Ray."""

from __future__ import annotations

import io
import json
import sys
import time

import pytest
import torch

from exits.checkpoints import FORMAT, check_checkpoint, read_checkpoint
from exits.config import load_config, load_yaml
from exits.data.jsonstream import MAX_DEPTH, iter_members, loads
from exits.data.prepare import load_instances
from exits.data.validate import read_coco_json
from exits.evaluate.metrics import load_json

ALIAS_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}]"
        for i in range(8)
    ]
    + ["data: {name: *i}"]
)  # fmt: skip  (9 ** 9 = 387 M leaves once expanded, from < 1 KB)


def test_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    """Item 7 (round 2): a 472-byte alias bomb grew past 2.6 GB (the type error repr()'d it)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 1000
    t = time.time()
    with pytest.raises(ValueError, match=r"line 1: YAML anchors and aliases .* not allowed") as e:
        load_config(str(path))
    assert time.time() - t < 2 and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="anchors and aliases"):
        load_config("demo", ["data.name=*a"])


def test_base_chain_loops_are_one_line(tmp_path):
    """Item 7: `base:` pointing to itself or a 2-file loop gave a RecursionError traceback."""
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ValueError, match=r"`base:` chain loops: self.yaml -> self.yaml"):
        load_yaml(str(tmp_path / "self.yaml"))
    (tmp_path / "a.yaml").write_text("base: b.yaml\ndata: {name: a}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match=r"loops: a.yaml -> b.yaml -> a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: [1, 2]\n")
    with pytest.raises(ValueError, match="must be a file name"):
        load_yaml(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="top level must be a mapping, got list"):
        load_yaml(str(tmp_path / "d.yaml"))


def test_config_errors_cut_long_values():
    with pytest.raises(TypeError, match="generator.epochs") as e:
        load_config("demo", ["generator.epochs=" + "x" * 100_000])
    assert len(str(e.value)) < 300
    with pytest.raises(KeyError) as e:
        load_config("demo", ["data." + "k" * 100_000 + "=1"])
    assert len(str(e.value)) < 1000


def coco(annotations: list | None = None) -> dict:
    anns = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0}]  # fmt: skip
    return {"images": [{"id": 1, "file_name": "a.png", "height": 16, "width": 16}],
            "annotations": anns, "categories": [{"id": 1, "name": "x"}]}  # fmt: skip


def readers(path: str) -> list:
    """Every entry point that reads an annotation json: prepare (streamed), the hold-out split
    and val-for-stage-2 reader, the evaluator."""
    return [
        lambda: load_instances(path, "/nonexistent", check_files=False),
        lambda: read_coco_json(path),
        lambda: load_json(path),
    ]


def test_bom_is_accepted_everywhere(tmp_path):
    """Item 8 (round 2): prepare refused a UTF-8 BOM ("not valid JSON"), the evaluator took it."""
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(coco()).encode())
    inst, err = load_instances(str(path), str(tmp_path), check_files=False)
    assert inst["ann_id"].to_pylist() == [1] and err.num_rows == 0
    assert len(read_coco_json(str(path))["annotations"]) == 1
    assert len(load_json(str(path))["annotations"]) == 1


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"annotations": [], "images": [], "annotations": []}', "duplicate key 'annotations'"),
        ('{"annotations": [{"id": 1, "id": 2}]}', "duplicate key 'id'"),
        ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_DEPTH} levels"),
        ('{"annotations": [' + "[" * 100_000 + "]" * 100_000 + "]}", "nested deeper"),
        ('{"info": ' + "[" * 40 + "]" * 40 + "}", f"nested deeper than {MAX_DEPTH} levels"),
    ],
    ids=["dup-top", "dup-inner", "deep-100k", "deep-element", "deep-40"],
)
def test_one_json_rule_at_every_entry_point(tmp_path, text, match):
    """Item 8: a duplicate top-level `annotations` was labelled twice by prepare (standard
    readers keep one); 100,000-deep nesting gave a RecursionError traceback."""
    path = tmp_path / "x.json"
    path.write_text(text)
    for read in readers(str(path)):
        with pytest.raises(ValueError, match=match) as e:
            read()
        assert "is not valid JSON" in str(e.value) and "\n" not in str(e.value)


def test_normal_nesting_and_stream_still_work(tmp_path):
    deep_ok = {"annotations": [{"id": 1, "segmentation": [[1, 2, 3, 4, 5, 6]] * 50}]}
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(deep_ok))
    assert [k for k, _ in iter_members(str(path))] == ["annotations"]
    assert loads(b"\xef\xbb\xbf [1] ") == [1]


def test_iscrowd_must_be_boolean_or_01(tmp_path):
    """Item 8: `iscrowd: "0"` (a string) was taken as crowd."""
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": v}
            for i, v in enumerate([0, 1, False, True, "0", 2, None, 0.0], 1)]  # fmt: skip
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco(anns)))
    inst, err = load_instances(str(path), str(tmp_path), check_files=False)
    assert sorted(inst["ann_id"].to_pylist()) == [1, 3, 8]
    reasons = dict(zip(err["ann_id"].to_pylist(), err["reason"].to_pylist()))
    assert "crowd annotation" in reasons[2] and "crowd annotation" in reasons[4]
    for a in (5, 6, 7):
        assert reasons[a].startswith("iscrowd must be a boolean or 0/1"), reasons[a]


def fake_checkpoint(path, **over) -> str:
    obj = {"format": FORMAT, "builder": "vit_tiny_demo", "kind": "generator",
           "builder_kwargs": {"img_size": 96}, "state_dict": {}, "meta": {}, **over}  # fmt: skip
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"kind": "extractor"}, "is a 'extractor' checkpoint, not a generator"),
        ({"kind": "x" * 10_000}, "kind .* is not one of"),
        ({"builder": "nope"}, "unknown builder 'nope'"),
        ({"builder_kwargs": {"img_size": 1_000_000}}, r"img_size = 1000000 must be an int in \[16, 2048\]"),
        ({"builder_kwargs": {"img_size": 98}}, "a multiple of 4"),
        ({"builder_kwargs": {"img_size": True}}, "img_size = True"),
        ({"builder_kwargs": {"read": "os.system"}}, r"builder_kwargs \['read'\] not allowed"),
        ({"builder_kwargs": {"trainable_blocks": 10**9}}, "trainable_blocks"),
    ],
)  # fmt: skip
def test_checkpoints_checked_before_ray(tmp_path, monkeypatch, load_script, over, match):
    """Item 9 (round 2): img_size 1e6 from a checkpoint sized crop tasks at 2.73 TiB (failed
    after 65 s); a checkpoint of the wrong kind was refused only after Ray started (45 s)."""
    ckpt = fake_checkpoint(tmp_path / "c.pt", **over)
    with pytest.raises(ValueError, match=match) as e:
        read_checkpoint(ckpt, kind="generator")
    assert len(str(e.value)) < 400
    job = load_script("jobs/pseudo_label.py")
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` would fail the test
    with pytest.raises(ValueError, match=match):
        job.main(["--checkpoint", ckpt, "--annotations", "a.json", "--images", str(tmp_path),
                  "--output", str(tmp_path / "run")])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_sane_checkpoint_passes():
    obj = {"format": FORMAT, "builder": "vit_tiny_demo", "kind": "generator",
           "builder_kwargs": {"img_size": 96, "trainable_blocks": -1}}  # fmt: skip
    assert check_checkpoint(obj, kind="generator") is obj
