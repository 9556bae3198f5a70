"""Bad command-line input gets one line, not a silent surprise: `prepare` keeps to the image
root, `predict` refuses a minimum length above the maximum, `export` writes into a new folder."""
import json
import logging

import pytest
from PIL import Image

from mplug_jax import cli
from mplug_jax.data import prepare
from mplug_jax.interop import official_io
from mplug_jax.interop.errors import CheckpointError
from mplug_jax.predict import Settings


def _image(path, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _layout(tmp_path):
    """Image root with 3 images, one image beside the root, one elsewhere (absolute path)."""
    root = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _image(root / name)
    (root / "sub").mkdir()
    beside = _image(tmp_path / "private.jpg")
    elsewhere = _image(tmp_path / "other" / "x.jpg")
    recs = [{"image": "a.jpg", "caption": "one"}, {"image": "b.jpg", "caption": "two"},
            {"image": "sub/../c.jpg", "caption": "three"},  # stays inside: allowed
            {"image": "../private.jpg", "caption": "beside"},
            {"image": str(elsewhere), "caption": "absolute"}]
    ann = tmp_path / "pretrain.json"
    ann.write_text(json.dumps(recs))
    return root, ann, beside


def test_prepare_skips_images_outside_the_image_root(tmp_path, caplog, capsys):
    root, ann, beside = _layout(tmp_path)
    with caplog.at_level(logging.WARNING):
        rc = cli.main(["prepare", "--format", "pretrain", "--annotations", str(ann),
                       "--image-root", str(root), "--out", str(tmp_path / "out"),
                       "--max-skip-rate", "0.5"])
    assert rc == 0
    assert "3 records written, 2 skipped (outside_root=2)" in capsys.readouterr().out
    assert "../private.jpg is outside the image root" in caplog.text
    assert "2 records point outside the image root" in caplog.text
    # Under the default skip rate, a file that mostly points elsewhere fails as a whole.
    with pytest.raises(prepare.transforms.DataError, match="outside_root=2"):
        prepare.prepare("pretrain", str(ann), str(root), str(tmp_path / "strict"))


def test_prepare_reads_outside_images_when_allowed(tmp_path, capsys):
    root, ann, _ = _layout(tmp_path)
    rc = cli.main(["prepare", "--format", "pretrain", "--annotations", str(ann),
                   "--image-root", str(root), "--out", str(tmp_path / "out"),
                   "--allow-outside-root"])
    assert rc == 0
    assert "5 records written, 0 skipped" in capsys.readouterr().out


def test_prepare_vqa_extra_roots_count_as_inside(tmp_path):
    vqa_root, vg_root = tmp_path / "coco", tmp_path / "vg"
    _image(vqa_root / "q.jpg")
    _image(vg_root / "v.jpg")
    ann = tmp_path / "vqa.json"
    ann.write_text(json.dumps([
        {"image": "q.jpg", "question": "what?", "answer": ["red"], "question_id": 1},
        {"image": "v.jpg", "question": "what?", "answer": ["red"], "question_id": 2,
         "dataset": "vg"}]))
    report = prepare.prepare("vqa", str(ann), str(vqa_root), str(tmp_path / "out"),
                             roots={"vg": str(vg_root)})
    assert report["splits"]["train"] == {"written": 2, "skipped": {}}


def test_predict_refuses_min_length_above_max_length(tmp_path, capsys):
    rc = cli.main(["predict", "--checkpoint", str(tmp_path / "never_read"), "--image", "x.jpg",
                   "--min-length", "30", "--max-length", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == "error: --min-length 30 is above --max-length 5: no output could satisfy " \
                  "both\n"
    # One of the two from the task's defaults (caption: max 25) is checked too.
    with pytest.raises(ValueError, match="min_length 30 is above max_length 25"):
        Settings.for_task("caption", min_length=30)
    with pytest.raises(ValueError, match="beam_size >= 1"):
        Settings.for_task("vqa", beam_size=0)


def test_save_state_dict_creates_missing_folders(tmp_path):
    out = tmp_path / "new" / "deeper" / "w.safetensors"
    official_io.save_state_dict({"w": __import__("numpy").ones(3, "float32")}, str(out))
    assert official_io.load_state_dict(str(out))["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(CheckpointError, match="is a directory"):
        official_io.save_state_dict({}, str(tmp_path / "new"))


def test_export_cli_into_a_missing_folder(tmp_path, pretrain_workdir):
    out = tmp_path / "exports" / "run1" / "exp.safetensors"
    assert cli.main(["export", "--ckpt", str(pretrain_workdir), "--out", str(out)]) == 0
    assert out.is_file()
    assert (out.parent / "exp.config_bert.json").is_file()
