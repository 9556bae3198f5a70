"""Scorers refuse result files they cannot score honestly: not JSON, empty, repeated queries,
null / NaN / wrongly typed values. Library: `ScoreInputError` naming the file and the first bad
entry; CLI: that one line and exit code 2."""
import json

import pytest

from mplug_jax import cli, scoring
from mplug_jax.scoring import caption, retrieval
from mplug_jax.scoring.checks import ScoreInputError


def _write(path, text):
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Small valid annotation files of every task."""
    out = {
        "caption": [{"filename": "COCO_val2014_000000000001.jpg",
                     "sentences": [{"raw": "A dog."}]},
                    {"filename": "COCO_val2014_000000000002.jpg",
                     "sentences": [{"raw": "A cat."}]}],
        "vqa": [{"question_id": 1, "answer": ["yes"] * 10, "answer_type": "yes/no"}],
        "retrieval": [{"image": f"im{i}.jpg", "caption": [f"caption {i}"]} for i in range(3)],
        "grounding": [["a.jpg", 0, [0, 0, 10, 10], "the dog", []]],
        "nlvr2": [{"images": ["dev/a-img0.png", "dev/a-img1.png"], "sentence": "two dogs",
                   "label": "True"}],
        "snli_ve": [{"Flikr30kID": "1", "sentence2": "a dog", "gold_label": "entailment"}],
    }
    paths = {k: _write(tmp_path / f"{k}_ann.json", v) for k, v in out.items()}
    paths["video_qa"] = _write(tmp_path / "video_qa_ann.jsonl",
                               '{"video_id": "v", "question": "what?", "answer": "dog"}\n')
    return paths


def _retrieval_result(i2t, t2i=None):
    t2i = t2i if t2i is not None else [{"text": "im0.jpg#0", "caption": "caption 0",
                                        "images": ["im0.jpg"]}]
    return {"format": retrieval.RESULT_FORMAT, "top_n": 10, "k_test": {}, "i2t": i2t,
            "t2i": t2i}


_I2T = [{"image": "im0.jpg", "texts": ["im0.jpg#0"]}]

# (task, result content, what the message must say) - each scored wrong or crashed before.
BAD = {
    "caption_duplicate_id": ("caption", [
        {"question_id": "COCO_val2014_000000000001.jpg", "pred_caption": "a dog"},
        {"question_id": "COCO_val2014_000000000002.jpg", "pred_caption": "a cat"},
        {"question_id": "COCO_val2014_000000000001.jpg", "pred_caption": "a bird"}],
        "entry 2: image '1' repeats entry 0"),
    "caption_same_image_two_id_forms": ("caption", [
        {"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"},
        {"image_id": "COCO_val2014_000000000001.jpg", "caption": "a bird"}],
        "entry 2: image '1' repeats entry 0"),
    "caption_nan": ("caption", '[{"image_id": 1, "caption": NaN}, '
                               '{"image_id": 2, "caption": "a cat"}]',
                    "entry 0: 'caption' must be a string, got NaN"),
    "caption_null": ("caption", [{"image_id": 1, "caption": "a dog"},
                                 {"image_id": 2, "caption": None}],
                     "entry 1: 'caption' must be a string, got null"),
    "caption_empty": ("caption", [], "is empty"),
    "vqa_empty": ("vqa", [], "is empty"),
    "vqa_null_answer": ("vqa", [{"question_id": 1, "answer": None}],
                        "entry 0: 'answer' must be a string, got null"),
    "vqa_duplicate": ("vqa", [{"question_id": 1, "answer": "yes"},
                              {"question_id": 1, "answer": "no"}],
                      "entry 1: question_id 1 repeats entry 0"),
    "retrieval_duplicate_query": ("retrieval", _retrieval_result(_I2T * 4),
                                  "i2t entry 1: image 'im0.jpg' repeats i2t entry 0"),
    "retrieval_null_texts": ("retrieval", _retrieval_result([{"image": "im0.jpg",
                                                              "texts": None}]),
                             "i2t entry 0: 'texts' must be a list"),
    "retrieval_no_queries": ("retrieval", _retrieval_result(_I2T, []), "is empty"),
    "retrieval_no_top_n": ("retrieval", {**_retrieval_result(_I2T), "top_n": None},
                           "'top_n' must be a positive integer"),
    "grounding_null_box": ("grounding", [{"id": 0, "pred_box": None}],
                           "entry 0: 'pred_box' must be a list of 4 items"),
    "grounding_nan_box": ("grounding", '[{"id": 0, "pred_box": [0, NaN, 1, 1]}]',
                          "entry 0: 'pred_box' must be a list of 4 items, each a finite "
                          "number"),
    "nlvr2_empty": ("nlvr2", [], "is empty"),
    "nlvr2_null_id": ("nlvr2", [{"id": None, "pred": "True"}],
                      "entry 0: 'id' must be an integer, got null"),
    "nlvr2_only_unknown_ids": ("nlvr2", [{"id": 5, "pred": "True"}],
                               "none of the 1 result rows has an id of the annotation file"),
    "snli_ve_duplicate": ("snli_ve", [{"id": 0, "pred": "entailment"},
                                      {"id": 0, "pred": "neutral"}],
                          "entry 1: id 0 repeats entry 0"),
    "snli_ve_null_label": ("snli_ve", [{"id": 0, "pred": "entailment", "label": None}],
                           "entry 0: 'label' must be a string, got null"),
    "video_qa_duplicate": ("video_qa", [{"question_id": 0, "answer": "dog"},
                                        {"question_id": 0, "answer": "cat"}],
                           "entry 1: question_id 0 repeats entry 0"),
    "video_qa_empty": ("video_qa", [], "is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_result_file_raises_naming_file_and_entry(case, files, tmp_path):
    task, content, message = BAD[case]
    results = _write(tmp_path / "results.json", content)
    with pytest.raises(ScoreInputError) as err:
        scoring.score_file(task, results, files[task])
    assert results in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("case", ["caption_nan", "vqa_empty", "retrieval_null_texts",
                                  "grounding_null_box", "nlvr2_null_id"])
def test_cli_prints_one_line_and_exits_2(case, files, tmp_path, capsys):
    task, content, message = BAD[case]
    results = _write(tmp_path / "results.json", content)
    rc = cli.main(["score", "--task", task, "--results", results, "--annotations", files[task]])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("task", scoring.TASKS)
def test_results_that_are_not_json_name_the_file(task, files, tmp_path, capsys):
    results = _write(tmp_path / "results.json", "{not json")
    rc = cli.main(["score", "--task", task, "--results", results, "--annotations", files[task]])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"results file {results} is not valid JSON" in err and err.count("\n") == 1


def test_annotations_that_are_not_json_name_the_file(files, tmp_path):
    results = _write(tmp_path / "results.json", [{"question_id": 1, "answer": "yes"}])
    bad = _write(tmp_path / "ann.json", "[{")
    with pytest.raises(ScoreInputError, match=f"annotations file {bad} is not valid JSON"):
        scoring.score_file("vqa", results, bad)
    results = _write(tmp_path / "results.json", [{"id": 0, "pred": "True"}])
    with pytest.raises(ScoreInputError, match=f"{bad}: not valid JSON"):  # read by sources
        scoring.score_file("nlvr2", results, bad)


def test_valid_files_still_score(files, tmp_path):
    results = _write(tmp_path / "r.json", [{"question_id": 1, "answer": "yes"}])
    assert scoring.score_file("vqa", results, files["vqa"])["acc"] == 1.0
    got = scoring.score_file("retrieval", _write(tmp_path / "r2.json", _retrieval_result(_I2T)),
                             files["retrieval"])
    assert (got["num_images"], got["num_texts"], got["txt_r1"]) == (1, 1, 100.0)
    preds = caption.read_results(_write(tmp_path / "r3.json", [
        {"image_id": 1, "caption": "a dog"}, {"question_id": "x_2.jpg", "pred_caption": ""}]))
    assert preds == {"1": "a dog", "2": ""}


def test_score_help_lists_the_tasks(capsys):
    assert tuple(scoring.available()) == scoring.TASKS
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    assert "{" + ",".join(scoring.TASKS) + "}" in capsys.readouterr().out


def test_grounding_box_layouts(tmp_path, capsys):
    """referit-style split boxes are corners (official) and can be truncated to ints as the
    official `pull_item` does; the default reads RefCOCO's [x, y, w, h]."""
    split = _write(tmp_path / "referit.json", [["a.jpg", 0, [2.7, 3.2, 12.9, 13.8], "dog", []]])
    res = _write(tmp_path / "res.json", [{"id": 0, "pred_box": [2, 3, 12, 13]}])
    G = scoring.score_file
    assert G("grounding", res, split, corners=True, int_box=True)["miou"] == pytest.approx(1.0)
    as_corners = G("grounding", res, split, corners=True)["miou"]
    assert as_corners == pytest.approx(9.3 * 9.8 / (100 + 10.2 * 10.6 - 9.3 * 9.8))
    as_xywh = G("grounding", res, split)["miou"]  # box read as 12.9 x 13.8 from (2.7, 3.2)
    assert as_xywh < 0.5
    base = ["score", "--task", "grounding", "--results", res, "--annotations", split]
    assert cli.main(base + ["--boxes", "corners", "--int-box"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(1.0)
    assert cli.main(base) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(as_xywh)
    vqa = ["score", "--task", "vqa", "--results", res, "--annotations", split, "--int-box"]
    assert cli.main(vqa) == 2
    assert "--boxes / --int-box are for --task grounding" in capsys.readouterr().err
