import argparse
import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from no_tensorflow import run_prepare_without_tensorflow
from mplug_jax.data import prepare
from mplug_jax.data.formats import builder as tfds_builder
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.ops.image import DataError


def _images(root):
    root.mkdir(parents=True, exist_ok=True)
    photo = skdata.coffee()
    Image.fromarray(photo).resize((40, 30)).save(root / "a.jpg", quality=92)
    Image.fromarray(skdata.astronaut()).resize((24, 24)).save(root / "b.png")
    Image.fromarray(photo).resize((32, 20)).convert("L").save(root / "gray.jpg")
    Image.fromarray(photo).resize((20, 20)).convert("CMYK").save(root / "cmyk.jpg")
    (root / "empty.jpg").write_bytes(b"")
    return root


def _pretrain_ann(tmp_path):
    recs = [{"image": "a.jpg", "caption": "A Cup of coffee."},
            {"image": "b.png", "caption": ["an astronaut", "a woman"]},
            {"image": "gray.jpg", "caption": "gray coffee"},
            {"image": "cmyk.jpg", "caption": "cmyk coffee"},
            {"image": "empty.jpg", "caption": "empty"},
            {"image": "missing.jpg", "caption": "missing"}]
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(recs))
    return str(path)


def test_prepare_pretrain_roundtrip_into_pipeline(tmp_path):
    root = _images(tmp_path / "img")
    ann = _pretrain_ann(tmp_path)
    with pytest.raises(DataError, match="empty_file=1"):  # 2 of 6 > 5 %: nothing written
        prepare.prepare("pretrain", ann, str(root), str(tmp_path / "strict"))
    report = prepare.prepare("pretrain", ann, str(root), str(tmp_path / "out"),
                             max_skip_rate=0.5)
    assert report["splits"]["train"] == {"written": 4,
                                         "skipped": {"empty_file": 1, "missing_file": 1}}
    assert "4 records written, 2 skipped" in prepare.format_report(report)
    src = tfds_builder.load_prepared(str(tmp_path / "out"), "pretrain")["train"]
    assert len(src) == 4
    by_id = {int(src[i]["id"]): src[i] for i in range(len(src))}
    assert sorted(by_id) == [0, 1, 2, 3]
    np.testing.assert_array_equal(  # RGB JPEG bytes are stored unchanged
        by_id[0]["image"], np.asarray(Image.open(root / "a.jpg").convert("RGB")))
    np.testing.assert_array_equal(by_id[1]["image"], np.asarray(Image.open(root / "b.png")))
    assert by_id[2]["image"].shape == (20, 32, 3) and by_id[3]["image"].shape == (20, 20, 3)
    assert [c.decode() for c in by_id[1]["caption"]] == ["an astronaut", "a woman"]
    batch = next(iter(pretrain_input.dataset(src, image_size=16, batch_size=4, train=False)))
    assert batch["image"].shape == (4, 16, 16, 3) and sorted(batch["idx"].tolist()) == [0, 1, 2, 3]
    again = prepare.prepare("pretrain", ann, str(root), str(tmp_path / "out"),
                            max_skip_rate=0.5)
    assert again.get("already_prepared")


def test_prepare_names_a_truncated_image_in_its_skip_message(tmp_path, caplog):
    root = _images(tmp_path / "img")
    data = (root / "a.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    recs = [{"image": "a.jpg", "caption": "whole"}, {"image": "cut.jpg", "caption": "cut"}]
    (tmp_path / "ann.json").write_text(json.dumps(recs))
    with caplog.at_level("WARNING", logger="mplug_jax.data.formats.builder"):
        report = prepare.prepare("pretrain", str(tmp_path / "ann.json"), str(root),
                                 str(tmp_path / "out"), max_skip_rate=0.5)
    assert report["splits"]["train"] == {"written": 1, "skipped": {"truncated": 1}}
    skips = [r.getMessage() for r in caplog.records if "skipped (truncated)" in r.getMessage()]
    assert len(skips) == 1 and str(root / "cut.jpg") in skips[0], skips
    assert "<bytes>" not in skips[0]


def test_prepare_vqa_train_and_eval_splits(tmp_path):
    root = _images(tmp_path / "coco")
    vg = _images(tmp_path / "vg")
    train = [{"question_id": 1, "question": "What is this?", "image": "a.jpg", "dataset": "vqa",
              "answer": ["coffee"] * 7 + ["cup"] * 3, "ocr": [[[0, 0, 1, 1], "CAFE"]],
              "object_label": "cup&&table"},
             {"question_id": 2, "question": "Who?", "image": "b.png", "dataset": "vg",
              "answer": "astronaut"}]
    test = [{"question_id": 3, "question": "Color?", "image": "gray.jpg"}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    report = prepare.prepare("vqa", {"train": [str(tmp_path / "train.json")],
                                     "test": [str(tmp_path / "test.json")]},
                             str(root), str(tmp_path / "out"), roots={"vg": str(vg)})
    assert {k: v["written"] for k, v in report["splits"].items()} == {"train": 2, "test": 1}
    ds = tfds_builder.load_prepared(str(tmp_path / "out"), "vqa")
    recs = {ds["train"][i]["question_id"].decode(): ds["train"][i] for i in range(2)}
    a = recs["1"]
    assert dict(zip([x.decode() for x in a["answers"]], np.asarray(a["weights"]).tolist())) \
        == pytest.approx({"coffee": 0.7, "cup": 0.3})
    assert [t.decode() for t in a["ocr_tokens"]] == ["CAFE"]
    assert a["object_label"] == b"cup&&table" and a["image"].shape == (30, 40, 3)
    assert recs["2"]["dataset"] == b"vg" and np.asarray(recs["2"]["weights"]).tolist() == [0.5]
    t = ds["test"][0]
    assert t["question"] == b"Color?" and len(t["answers"]) == 0


def test_cli_prepare_without_tensorflow(tmp_path):
    """Runs the CLI entry points in a fresh interpreter where `import tensorflow` fails."""
    root = _images(tmp_path / "img")
    ann = _pretrain_ann(tmp_path)
    stdout = run_prepare_without_tensorflow(f"""
        args = p.parse_args(["--format", "pretrain", "--annotations", {ann!r},
                             "--image-root", {str(root)!r}, "--out", {str(tmp_path / "o")!r},
                             "--max-skip-rate", "0.5"])
        assert prepare.run_prepare(args) == 0
        src = tfds_builder.load_prepared({str(tmp_path / "o")!r}, "pretrain")["train"]
        assert len(src) == 4 and src[0]["image"].ndim == 3
    """)
    assert "4 records written, 2 skipped (missing_file=1, empty_file=1)" in stdout


def test_cli_args_parse():
    p = argparse.ArgumentParser()
    prepare.add_prepare_args(p)
    args = p.parse_args(["--format", "vqa", "--annotations", "a.json", "b.json",
                         "--image-root", "r", "--out", "o", "--root", "vg=/vg"])
    assert args.annotations == ["a.json", "b.json"] and args.root == ["vg=/vg"]
    with pytest.raises(SystemExit):
        p.parse_args(["--format", "nope", "--annotations", "a", "--image-root", "r",
                      "--out", "o"])
