"""Readers for the official mPLUG / mPLUG-2 annotation formats
(docs/official-formats.md#annotation-formats).

Each reader parses its annotation files once and returns a :class:`RecordSource`: a random-access
list of plain dict records with absolute image paths (images are decoded later by the pipeline).
Malformed records (not an object, missing or mistyped fields) are skipped, counted by reason in
``source.skipped``, and logged with file name and position; a :class:`DataError` is raised when
they exceed `max_skip_rate` of a file set, and for files that are not valid JSON at all.

Record fields per format (paths absolute):
- pretrain: image, caption (str or list of str, raw: the pipeline applies ``pre_caption``)
- vqa: image, question (raw, as official v1), question_id, dataset, answers + weights (train),
  ocr, object_label (when present)
- coco_caption: image, image_id (file name); train: caption; eval: gold_captions
- retrieval: train: image, caption, image_index; eval: image, image_index (+ `texts`, `txt2img`,
  `img2txt` on the source)
- grounding: image, bbox (x, y, w, h pixels), phrase, id (position in the split file)
- nlvr2: images (2 paths), sentence, label; snli_ve: image, sentence, label
- video_qa: video (frame folder or file, see :func:`video.video_path`), video_id, question,
  answer, question_id; video_caption: video, video_id, caption (train) | gold_captions (eval)
- msrvtt_retrieval: video, video_id (clip_name), caption; vatex_caption: video, video_id,
  gold_captions (enCap)
"""
from __future__ import annotations

import collections
import collections.abc
import json
import logging
import os
from typing import Any, Callable, Iterable, Sequence

from mplug_jax.data.ops import text
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import SKIP_REASONS, BadRecord, DataError

logger = logging.getLogger(__name__)

SNLI_VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}


class RecordSource(collections.abc.Sequence):
    """A list of parsed records plus the skip counts of parsing (random access, picklable)."""

    def __init__(self, records: list[dict], skipped: dict[str, int] | None = None,
                 name: str = ""):
        self.records, self.name = records, name
        self.skipped = dict(skipped or dict.fromkeys(SKIP_REASONS, 0))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}: {len(self)} records, "
                f"{sum(self.skipped.values())} skipped)")


def _as_list(paths: str | os.PathLike | Sequence) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def read_annotations(path: str) -> list[Any]:
    """A JSON array file, or JSON lines (``.jsonl``; a bad line becomes ``None``).

    Raises:
      DataError: the file is missing, or a ``.json`` file is not a valid JSON array.
    """
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            out = []
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    logger.warning("%s line %d: invalid JSON (%s)", path, n + 1, e)
                    out.append(None)
            return out
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _build(items: Iterable[tuple[str, int, Any]], parse: Callable[[Any, int], list[dict]],
           name: str, max_skip_rate: float, kind: type = dict) -> RecordSource:
    """Parse (file, position, raw) items; each raw record of type `kind` yields records."""
    records: list[dict] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    total = 0
    for path, pos, raw in items:
        total += 1
        try:
            if not isinstance(raw, kind):
                raise BadRecord("bad_record", f"not a {kind.__name__}: {raw!r:.60}")
            records.extend(parse(raw, pos))
        except BadRecord as e:
            skipped[e.reason] += 1
            logger.warning("%s record %d skipped (%s): %s", path, pos, e.reason, e)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            skipped["bad_record"] += 1
            logger.warning("%s record %d skipped (bad_record): %r", path, pos, e)
    n_skipped = sum(skipped.values())
    if total and n_skipped / total > max_skip_rate:
        raise DataError(f"{name}: {n_skipped} of {total} annotation records malformed "
                        f"(> max_skip_rate={max_skip_rate}): "
                        + ", ".join(f"{k}={v}" for k, v in skipped.items() if v))
    if n_skipped:
        logger.warning("%s: skipped %d of %d annotation records", name, n_skipped, total)
    return RecordSource(records, skipped, name)


def _items(files: list[str]) -> Iterable[tuple[str, int, Any]]:
    for path in files:
        for pos, raw in enumerate(read_annotations(path)):
            yield path, pos, raw


def _str(raw: dict, key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("bad_record", f"field {key!r} missing or not a non-empty string")
    return value


def _caption_field(value: Any) -> str | list[str]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        caps = [c for c in value if isinstance(c, str) and c.strip()]
        if caps:
            return caps
    raise BadRecord("bad_caption", f"caption missing, empty or not text: {value!r:.60}")


# -- 1.4 pretraining -------------------------------------------------------------------------

def pretrain(annotations: str | Sequence[str], image_root: str = "", *,
             max_skip_rate: float = 0.01) -> RecordSource:
    """Pretraining json files (records concatenated): image path, caption str or list."""
    def parse(raw, pos):
        return [{"image": os.path.join(image_root, _str(raw, "image")),
                 "caption": _caption_field(raw.get("caption"))}]

    files = _as_list(annotations)
    return _build(_items(files), parse, f"pretrain{files}", max_skip_rate)


# -- 1.5 VQA ---------------------------------------------------------------------------------

def vqa_answer_weights(record: dict) -> tuple[list[str], list[float]]:
    """Official train targets: vqa -> distinct answers weighted count/len; vg/gqa -> weight 0.5."""
    answer = record.get("answer")
    if record.get("dataset", "vqa") == "vqa":
        if isinstance(answer, str):
            answer = [answer]
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str)
                                                                 for a in answer):
            raise BadRecord("bad_record", f"vqa answers must be a list of strings: {answer!r:.60}")
        counts = collections.Counter(answer)
        return list(counts), [n / len(answer) for n in counts.values()]
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not isinstance(answer, str):
        raise BadRecord("bad_record", f"{record.get('dataset')} answer must be a string")
    return [answer], [0.5]


def vqa_question_text(record: dict, add_ocr: bool = True, add_object: bool = True) -> str:
    """Question fed to the tokenizer: raw question [+ " [SEP] " OCR] [+ " [SEP] " objects]."""
    question = record["question"]
    ocr = record.get("ocr")
    if add_ocr and ocr:
        tokens = " ".join(str(t[1]) for t in ocr if isinstance(t, (list, tuple)) and len(t) > 1)
        question = question + " [SEP] " + text.pre_question(tokens, 30)
    labels = record.get("object_label")
    if add_object and labels:
        question = question + " [SEP] " + " ".join(labels.split("&&"))
    return question


def vqa(annotations: str | Sequence[str], roots: dict[str, str], *, train: bool = True,
        max_skip_rate: float = 0.01) -> RecordSource:
    """VQA / VG / GQA json: image under ``roots[record['dataset']]`` (official vqa/vg/gqa_root)."""
    def parse(raw, pos):
        tag = raw.get("dataset", "vqa")
        if tag not in roots:
            raise BadRecord("bad_record",
                            f"dataset tag {tag!r} has no root; roots: {sorted(roots)}")
        rec = {"image": os.path.join(roots[tag], _str(raw, "image")),
               "question": _str(raw, "question"), "dataset": tag}
        if "question_id" in raw:
            rec["question_id"] = raw["question_id"]
        elif not train:
            raise BadRecord("bad_record", "evaluation record without question_id")
        if train:
            rec["answers"], rec["weights"] = vqa_answer_weights(raw)
        for key in ("ocr", "object_label"):
            if raw.get(key):
                rec[key] = raw[key]
        return [rec]

    files = _as_list(annotations)
    return _build(_items(files), parse, f"vqa{files}", max_skip_rate)


# -- 1.6 COCO caption (Karpathy) -------------------------------------------------------------

def _coco_folder(filepath: str) -> str:
    # Official quirk: train2014/val2014 images live in `train2014_img` / `val2014_img`.
    return {"train2014": "train2014_img", "val2014": "val2014_img"}.get(filepath, filepath)


def coco_caption(annotations: str | Sequence[str], coco_root: str, *, train: bool = True,
                 max_skip_rate: float = 0.01) -> RecordSource:
    """Karpathy-split entries: train = one record per sentence, eval = one per image."""
    def parse(raw, pos):
        filename = _str(raw, "filename")
        image = os.path.join(coco_root, _coco_folder(_str(raw, "filepath")), filename)
        sents = raw.get("sentences")
        if not isinstance(sents, list):
            raise BadRecord("bad_caption", "sentences missing")
        caps = [s["raw"].lower() for s in sents
                if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()]
        if not caps:
            raise BadRecord("bad_caption", "no usable sentence")
        base = {"image": image, "image_id": filename}
        if isinstance(raw.get("object_label"), str):
            base["object_labels"] = " ".join(dict.fromkeys(raw["object_label"].split("&&")))
        if train:
            return [{**base, "caption": c} for c in caps]
        return [{**base, "gold_captions": caps}]

    files = _as_list(annotations)
    return _build(_items(files), parse, f"coco_caption{files}", max_skip_rate)


# -- 1.7 retrieval ---------------------------------------------------------------------------

def retrieval(annotations: str | Sequence[str], image_root: str, *, train: bool = True,
              max_words: int = 30, max_skip_rate: float = 0.01) -> RecordSource:
    """COCO / Flickr30k retrieval (ALBEF format).

    Train: ``image_index`` is ``image_id`` mapped to 0..K-1 in order of first appearance (the
    ITC positive id). Eval: one record per image; the returned source also carries ``texts``
    (pre_caption'ed), ``txt2img`` (int per text) and ``img2txt`` (list of text indices per image).
    """
    files = _as_list(annotations)
    if train:
        ids: dict[Any, int] = {}

        def parse(raw, pos):
            image_id = raw.get("image_id")
            if image_id is None or isinstance(image_id, (list, dict)):
                raise BadRecord("bad_record", "image_id missing or not hashable")
            cap = raw.get("caption")
            if not isinstance(cap, str) or not text.pre_caption(cap, max_words):
                raise BadRecord("bad_caption", f"caption {cap!r:.60}")
            image = os.path.join(image_root, _str(raw, "image"))
            index = ids.setdefault(image_id, len(ids))
            return [{"image": image, "caption": text.pre_caption(cap, max_words),
                     "image_index": index}]

        return _build(_items(files), parse, f"retrieval{files}", max_skip_rate)

    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []

    def parse_eval(raw, pos):
        image = os.path.join(image_root, _str(raw, "image"))
        caps = _caption_field(raw.get("caption"))
        caps = [caps] if isinstance(caps, str) else caps
        img_index = len(img2txt)
        img2txt.append([])
        for cap in caps:
            img2txt[img_index].append(len(texts))
            texts.append(text.pre_caption(cap, max_words))
            txt2img.append(img_index)
        return [{"image": image, "image_index": img_index}]

    src = _build(_items(files), parse_eval, f"retrieval{files}", max_skip_rate)
    src.texts, src.txt2img, src.img2txt = texts, txt2img, img2txt
    return src


# -- 1.8 RefCOCO grounding -------------------------------------------------------------------

def _load_split_file(path: str) -> list:
    """The records of a TransVG split file: `.pth` (torch-saved list of tuples, read without
    torch and without running code from the file) or a json/jsonl list of the same."""
    if not path.endswith(".pth"):
        return read_annotations(path)
    from mplug_jax import safe_pickle
    if not os.path.isfile(path):
        raise DataError(f"grounding split file not found: {path}")
    try:
        records = safe_pickle.load(path)
    except safe_pickle.PickleReadError as e:
        raise DataError(f"grounding split file: {e}") from e
    if not isinstance(records, (list, tuple)):
        raise DataError(f"grounding split file {path} holds a {type(records).__name__}, not a "
                        "list of tuples")
    return list(records)


def grounding(split_file: str, image_dir: str, *, flickr: bool = False,
              corners: bool | None = None, int_box: bool = False,
              max_skip_rate: float = 0.01) -> RecordSource:
    """TransVG split tuples: (file, _, box, phrase, attrs) or flickr (file, box, phrase); the
    box is [x, y, w, h], or [x1, y1, x2, y2] with `corners` (default: `flickr`; official:
    referit and flickr). `int_box`: the box cast to int (truncated) first, as the official
    `pull_item` (so x2 = int(x) + int(w)). Boxes are returned as [x, y, w, h] pixels; phrases
    lower-cased (official); `id` = the tuple's position in the split file; empty phrases and
    boxes without area are skipped and counted."""
    corners = flickr if corners is None else corners

    def parse(raw, pos):
        file, box, phrase = (raw[0], raw[1], raw[2]) if flickr else (raw[0], raw[2], raw[3])
        nums = [float(v) for v in box]
        if int_box:
            nums = [float(int(v)) for v in nums]
        bbox = nums
        if corners and len(nums) == 4:
            bbox = [nums[0], nums[1], nums[2] - nums[0], nums[3] - nums[1]]
        if len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
            raise BadRecord("bad_record", f"degenerate box {box!r}")
        if not isinstance(phrase, str) or not isinstance(file, str):
            raise BadRecord("bad_record", "file or phrase is not a string")
        if not phrase.strip():
            raise BadRecord("bad_record", "empty referring expression")
        return [{"image": os.path.join(image_dir, file), "bbox": bbox, "phrase": phrase.lower(),
                 "id": pos}]

    # torch.load gives tuples, json gives lists.
    items = ((split_file, i, tuple(raw) if isinstance(raw, list) else raw)
             for i, raw in enumerate(_load_split_file(split_file)))
    return _build(items, parse, f"grounding[{split_file}]", max_skip_rate, kind=tuple)


# -- 1.9 NLVR2, 1.10 SNLI-VE -----------------------------------------------------------------

def nlvr2(annotations: str | Sequence[str], image_root: str, *, max_words: int = 30,
          max_skip_rate: float = 0.01) -> RecordSource:
    """NLVR2: two images, sentence (pre_caption), label 1 iff the string "True"."""
    def parse(raw, pos):
        images = raw.get("images")
        if not (isinstance(images, list) and len(images) == 2
                and all(isinstance(p, str) for p in images)):
            raise BadRecord("bad_record", "images must be a list of two paths")
        if "train" in images[0]:  # official: flatten the train sub-folders
            images = [f"train/{os.path.basename(p)}" for p in images]
        return [{"images": [os.path.join(image_root, p) for p in images],
                 "sentence": text.pre_caption(_str(raw, "sentence"), max_words),
                 "label": int(raw.get("label") == "True")}]

    files = _as_list(annotations)
    return _build(_items(files), parse, f"nlvr2{files}", max_skip_rate)


def snli_ve(annotation: str, image_root: str, *, max_words: int = 30,
            max_skip_rate: float = 0.01) -> RecordSource:
    """SNLI-VE: image = root/<id>.jpg, sentence (pre_caption), label 2/1/0."""
    def parse(raw, pos):
        label = raw.get("label")
        if label not in SNLI_VE_LABELS:
            raise BadRecord("bad_record", f"label {label!r} not in {sorted(SNLI_VE_LABELS)}")
        return [{"image": os.path.join(image_root, f"{_str(raw, 'image')}.jpg"),
                 "sentence": text.pre_caption(_str(raw, "sentence"), max_words),
                 "label": SNLI_VE_LABELS[label]}]

    return _build(_items([os.fspath(annotation)]), parse, f"snli_ve[{annotation}]",
                  max_skip_rate)


# -- 1.11 video ------------------------------------------------------------------------------

def video_qa(annotation: str, video_root: str, *, max_skip_rate: float = 0.01) -> RecordSource:
    """MSRVTT/MSVD/TGIF QA jsonl: video_id, question, answer; question_id = line index."""
    def parse(raw, pos):
        video_id = _str(raw, "video_id")
        return [{"video": video.video_path(video_root, video_id), "video_id": video_id,
                 "question": _str(raw, "question"), "answer": _str(raw, "answer"),
                 "question_id": pos}]

    return _build(_items([os.fspath(annotation)]), parse, f"video_qa[{annotation}]",
                  max_skip_rate)


def video_caption(annotation: str, video_root: str, *, train: bool = True,
                  max_skip_rate: float = 0.01) -> RecordSource:
    """mPLUG-2 video caption jsonl: train {video_id, caption}; test {video_id, golden_captions}."""
    def parse(raw, pos):
        video_id = _str(raw, "video_id")
        rec = {"video": video.video_path(video_root, video_id), "video_id": video_id}
        if train:
            rec["caption"] = _str(raw, "caption")
        else:
            golds = raw.get("golden_captions")
            if not isinstance(golds, list) or not golds:
                raise BadRecord("bad_caption", "golden_captions missing")
            rec["gold_captions"] = [g for g in golds if isinstance(g, str)]
        return [rec]

    return _build(_items([os.fspath(annotation)]), parse, f"video_caption[{annotation}]",
                  max_skip_rate)


def msrvtt_retrieval(annotation: str, video_root: str, *, max_words: int = 40,
                     max_skip_rate: float = 0.01) -> RecordSource:
    """MSRVTT retrieval jsonl as mPLUG v1 reads BLIP's `msrvtt_test.jsonl`: one line per
    video, `clip_name` and `caption` (pre_caption to `max_words`, official 40); the caption of
    line i belongs to the video of line i (txt2video is the identity)."""
    def parse(raw, pos):
        clip = _str(raw, "clip_name")
        cap = raw.get("caption")
        if not isinstance(cap, str) or not text.pre_caption(cap, max_words):
            raise BadRecord("bad_caption", f"caption {cap!r:.60}")
        return [{"video": video.video_path(video_root, clip), "video_id": clip,
                 "caption": text.pre_caption(cap, max_words)}]

    return _build(_items([os.fspath(annotation)]), parse, f"msrvtt_retrieval[{annotation}]",
                  max_skip_rate)


def vatex_caption(annotation: str, video_root: str, *,
                  max_skip_rate: float = 0.01) -> RecordSource:
    """VATEX caption json as mPLUG v1 reads `vatex_public_test_english_v1.1.json`: an array of
    {`videoID`, `enCap`: [English references]} -> video, video_id, gold_captions."""
    def parse(raw, pos):
        video_id = _str(raw, "videoID")
        caps = raw.get("enCap")
        golds = [c for c in caps if isinstance(c, str) and c.strip()] \
            if isinstance(caps, list) else []
        if not golds:
            raise BadRecord("bad_caption", "enCap missing or without a usable reference")
        return [{"video": video.video_path(video_root, video_id), "video_id": video_id,
                 "gold_captions": golds}]

    return _build(_items([os.fspath(annotation)]), parse, f"vatex_caption[{annotation}]",
                  max_skip_rate)


FORMATS: dict[str, Callable[..., RecordSource]] = {
    "pretrain": pretrain, "vqa": vqa, "coco_caption": coco_caption, "retrieval": retrieval,
    "grounding": grounding, "nlvr2": nlvr2, "snli_ve": snli_ve, "video_qa": video_qa,
    "video_caption": video_caption, "msrvtt_retrieval": msrvtt_retrieval,
    "vatex_caption": vatex_caption,
}
