import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from mplug_jax.data.formats import coco_caption as coco_caption_format
from mplug_jax.data.formats import grounding as grounding_format
from mplug_jax.data.formats import nlvr2 as nlvr2_format
from mplug_jax.data.formats import pretrain as pretrain_format
from mplug_jax.data.formats import retrieval as retrieval_format
from mplug_jax.data.formats import snli_ve as snli_ve_format
from mplug_jax.data.formats import video_caption as video_caption_format
from mplug_jax.data.formats import video_qa as video_qa_format
from mplug_jax.data.formats import vqa as vqa_format
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import DataError


def _img(path, which="chelsea", size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(skdata, which)()).convert("RGB").resize(size).save(path)
    return path


def _dump(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_pretrain_multiple_files_and_malformed_records(tmp_path, caplog):
    _img(tmp_path / "img/coco/a.jpg")
    _img(tmp_path / "img/sbu/b.png", "astronaut")
    f1 = _dump(tmp_path / "coco.json", [{"image": "coco/a.jpg", "caption": "A cat."}] * 60)
    f2 = _dump(tmp_path / "sbu.json", [{"image": "sbu/b.png", "caption": ["one", "two"]}] * 39
               + [{"image": "sbu/b.png", "caption": []}])
    with pytest.raises(DataError, match="malformed"):  # 1 of 100 > 0.5 %
        pretrain_format.read([f1, f2], str(tmp_path / "img"), max_skip_rate=0.005)
    with caplog.at_level("WARNING", logger="mplug_jax.data.formats.base"):
        src = pretrain_format.read([f1, f2], str(tmp_path / "img"), max_skip_rate=0.02)
    assert len(src) == 99 and src.skipped["bad_caption"] == 1
    assert "sbu.json record 39" in caplog.text
    assert src[0]["image"] == os.path.join(tmp_path, "img", "coco/a.jpg")
    assert src[60]["caption"] == ["one", "two"]
    batch = next(iter(pretrain_input.dataset(src, image_size=16, batch_size=4, train=False)))
    assert batch["image"].shape == (4, 16, 16, 3)


def test_invalid_json_files_raise_naming_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"image": "a.jpg", "caption": "x"},')
    with pytest.raises(DataError, match="broken.json"):
        pretrain_format.read(str(bad))
    with pytest.raises(DataError, match="not found"):
        pretrain_format.read(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="JSON array"):
        pretrain_format.read(_dump(tmp_path / "obj.json", {"image": "a"}))
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"video_id": "v1", "question": "q?", "answer": "a"}\n{oops\n\n'
                     '["not", "an", "object"]\n'
                     '{"video_id": "v2", "question": "q2", "answer": "b"}\n')
    src = video_qa_format.read(str(lines), str(tmp_path), max_skip_rate=0.9)
    assert [r["question_id"] for r in src] == [0, 3] and src.skipped["bad_record"] == 2


def test_vqa_weights_roots_and_question_text(tmp_path):
    ann = [
        {"question_id": 1, "question": "What is it?", "image": "train2014/a.jpg",
         "dataset": "vqa", "answer": ["down"] * 6 + ["table"] * 3 + ["up"],
         "ocr": [[[1, 2, 3, 4], "STOP!"], [[0, 0, 1, 1], "Sign"]], "object_label": "person&&car"},
        {"question_id": 2, "question": "Color?", "image": "VG_100K/2.jpg", "dataset": "vg",
         "answer": "red"},
        {"question_id": 3, "question": "Where?", "image": "g/3.jpg", "dataset": "gqa",
         "answer": "left"},
        {"question_id": 4, "question": "Broken?", "image": "x.jpg", "dataset": "ok-vqa",
         "answer": "x"},
    ]
    roots = {"vqa": "/coco", "vg": "/vg", "gqa": "/gqa"}
    src = vqa_format.read(_dump(tmp_path / "vqa.json", ann), roots, max_skip_rate=0.5)
    assert len(src) == 3 and src.skipped["bad_record"] == 1
    a, b, c = src
    assert a["image"] == "/coco/train2014/a.jpg" and b["image"] == "/vg/VG_100K/2.jpg"
    assert dict(zip(a["answers"], a["weights"])) == pytest.approx(
        {"down": 0.6, "table": 0.3, "up": 0.1})
    assert (b["answers"], b["weights"]) == (["red"], [0.5]) and c["weights"] == [0.5]
    assert vqa_format.question_text(a) == "What is it? [SEP] stop sign [SEP] person car"
    assert vqa_format.question_text(a, add_ocr=False, add_object=False) == "What is it?"
    test = vqa_format.read(_dump(tmp_path / "t.json", [{"question_id": 9, "question": "q",
                                                         "image": "a.jpg"}]), roots, train=False)
    assert "answers" not in test[0] and test[0]["question_id"] == 9


def test_coco_caption_karpathy_train_and_eval(tmp_path):
    ann = [{"filepath": "val2014", "filename": "COCO_val2014_1.jpg",
            "object_label": "person&&dog&&person",
            "sentences": [{"raw": "A Man walks."}, {"raw": "A dog, Running. "}]},
           {"filepath": "train2014", "filename": "COCO_train2014_2.jpg", "sentences": []}]
    f = _dump(tmp_path / "cap.json", ann)
    train = coco_caption_format.read(f, "/root", max_skip_rate=0.5)
    assert [r["caption"] for r in train] == ["a man walks.", "a dog, running. "]
    assert train[0]["image"] == "/root/val2014_img/COCO_val2014_1.jpg"
    assert train[0]["object_labels"] == "person dog"
    ev = coco_caption_format.read(f, "/root", train=False, max_skip_rate=0.5)
    assert len(ev) == 1 and ev[0]["gold_captions"] == ["a man walks.", "a dog, running. "]
    assert ev[0]["image_id"] == "COCO_val2014_1.jpg" and ev.skipped["bad_caption"] == 1


def test_retrieval_train_ids_and_eval_maps(tmp_path):
    train = [{"image": "a.jpg", "caption": "A red Bus!", "image_id": "184613"},
             {"image": "b.jpg", "caption": "x", "image_id": 7},
             {"image": "a.jpg", "caption": "another one", "image_id": "184613"}]
    src = retrieval_format.read(_dump(tmp_path / "tr.json", train), "/img")
    assert [r["image_index"] for r in src] == [0, 1, 0] and src[0]["caption"] == "a red bus"
    ev = [{"image": "a.jpg", "caption": ["c1", "C2."]}, {"image": "b.jpg", "caption": ["c3"]}]
    src = retrieval_format.read(_dump(tmp_path / "ev.json", ev), "/img", train=False)
    assert len(src) == 2 and src.texts == ["c1", "c2", "c3"]
    assert src.txt2img == [0, 0, 1] and src.img2txt == [[0, 1], [2]]


def test_grounding_json_tuples_and_pth(tmp_path):
    rows = [["a.jpg", 0, [10, 20, 30, 40], "Left Man", []], ["b.jpg", 0, [1, 1, 0, 5], "x", []]]
    src = grounding_format.read(_dump(tmp_path / "unc_val.json", rows), "/imgs", max_skip_rate=0.5)
    assert len(src) == 1 and src[0] == {"image": "/imgs/a.jpg", "bbox": [10.0, 20.0, 30.0, 40.0],
                                        "phrase": "left man", "id": 0}
    flickr = grounding_format.read(_dump(tmp_path / "f.json", [["c.jpg", [5, 6, 15, 26], "Dog"]]),
                                   "/f", flickr=True)
    assert flickr[0]["bbox"] == [5.0, 6.0, 10.0, 20.0]
    pth = tmp_path / "unc_testA.pth"
    pth.write_bytes(pickle.dumps([("a.jpg", 0, [1, 2, 3, 4], "Cat", [])]))  # no torch needed
    assert grounding_format.read(str(pth), "/imgs")[0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    try:
        import torch
    except ImportError:
        return
    torch.save([("a.jpg", 0, [1, 2, 3, 4], "Cat", [])], pth)
    assert grounding_format.read(str(pth), "/imgs")[0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    pth.write_bytes(b"not really torch")
    with pytest.raises(DataError, match=f"cannot read {pth}: truncated"):
        grounding_format.read(str(pth), "/imgs")


def test_nlvr2_and_snli_ve(tmp_path):
    ann = [{"images": ["train/14/x-img0.png", "train/14/x-img1.png"], "sentence": "Left: dogs!",
            "label": "True"},
           {"images": ["dev/y-img0.png", "dev/y-img1.png"], "sentence": "s", "label": "False"}]
    src = nlvr2_format.read(_dump(tmp_path / "nlvr.json", ann), "/n")
    assert src[0]["images"] == ["/n/train/x-img0.png", "/n/train/x-img1.png"]
    assert (src[0]["sentence"], src[0]["label"], src[1]["label"]) == ("left dogs", 1, 0)
    assert src[1]["images"][0] == "/n/dev/y-img0.png"
    ve = [{"image": "2248275918", "sentence": "Two men.", "label": "contradiction"},
          {"image": "1", "sentence": "s", "label": "entailment"},
          {"image": "2", "sentence": "s", "label": "maybe"}]
    src = snli_ve_format.read(_dump(tmp_path / "ve.json", ve), "/f", max_skip_rate=0.5)
    assert [r["label"] for r in src] == [0, 2] and src[0]["image"] == "/f/2248275918.jpg"
    assert src[0]["sentence"] == "two men"


def test_video_frames_folder_sampling(tmp_path):
    (tmp_path / "video7").mkdir()
    for i in range(10):
        shade = np.full((12, 16, 3), i * 20, np.uint8)
        Image.fromarray(shade).save(tmp_path / "video7" / f"{i:03d}.jpg")
    ann = tmp_path / "qa.jsonl"
    ann.write_text(json.dumps({"video_id": "video7", "question": "q", "answer": "a"}) + "\n")
    rec = video_qa_format.read(str(ann), str(tmp_path))[0]
    assert rec["video"] == str(tmp_path / "video7")
    frames = video.load_frames(rec["video"], 5)
    shades = [int(np.asarray(f).mean() / 20 + 0.5) for f in frames]
    assert shades == [0, 2, 4, 6, 8] == video.frame_indices(10, 5)
    assert video.frame_indices(3, 5) == [0, 1, 2, 2, 2]  # short videos repeat the last frame
    rng = np.random.default_rng(0)
    picks = video.frame_indices(100, 4, train=True, rng=rng)
    assert all(25 * k <= p < 25 * (k + 1) for k, p in enumerate(picks))
    cap = tmp_path / "cap.jsonl"
    cap.write_text(json.dumps({"video_id": "video7", "golden_captions": ["a", "b"]}) + "\n")
    assert video_caption_format.read(str(cap), str(tmp_path), train=False)[0]["gold_captions"] == [
        "a", "b"]
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    try:
        import av  # noqa: F401
        has_decoder = True
    except ImportError:
        try:
            import cv2  # noqa: F401
            has_decoder = True
        except ImportError:
            has_decoder = False
    if not has_decoder:
        with pytest.raises(DataError, match="PyAV"):
            video.load_frames(str(tmp_path / "clip.mp4"), 4)
    with pytest.raises(transforms.BadRecord):
        video.load_frames(str(tmp_path / "none.mp4"), 4)
