"""The official formats are found by name: every module of mplug_jax/data/formats/ is a format
with the attributes formats/__init__.py asks for, and a new module is picked up by `prepare`
without touching any other file."""
import argparse
import json
import pathlib
import sys
import textwrap

import pytest

from mplug_jax.data import formats, prepare
from mplug_jax.data.formats import base, builder

FORMATS_DIR = pathlib.Path(formats.__file__).parent
# What `prepare` wrote before the formats were one module each (CLI --format choices).
PREPARED_BEFORE = {"pretrain", "vqa", "coco_caption", "retrieval", "grounding", "nlvr2",
                   "snli_ve", "video_qa", "video_caption"}


def test_every_format_module_is_found_with_its_required_attributes():
    on_disk = {p.stem for p in FORMATS_DIR.glob("*.py")} - {"__init__", *formats.SHARED}
    assert set(formats.available()) == on_disk
    assert {"msrvtt_retrieval", "vatex_caption", "snli_ve_jsonl"} | PREPARED_BEFORE == on_disk
    for name in formats.available():
        module = formats.get(name)
        assert module.__doc__ and callable(module.read), name
        has = [hasattr(module, a) for a in formats.PREPARE_ATTRS]
        assert all(has) or not any(has), f"{name}: define all or none of {formats.PREPARE_ATTRS}"
        if all(has):
            assert callable(module.example) and callable(module.prepare_reader), name
            assert isinstance(module.DESCRIPTION, str) and module.DESCRIPTION, name
            assert set(module.FEATURES.values()) <= set(builder.KINDS), name
            assert "id" not in module.FEATURES, name  # every builder adds the record id
    for path in FORMATS_DIR.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name


def test_prepare_offers_the_preparable_formats():
    assert set(formats.preparable()) == PREPARED_BEFORE
    assert {f for f in formats.preparable() if builder.is_video(f)} == {"video_qa",
                                                                       "video_caption"}
    assert builder.builder_class("snli_ve").name == "mplug_snli_ve"
    parser = argparse.ArgumentParser()
    prepare.add_prepare_args(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "format")
    assert set(choices) == PREPARED_BEFORE


def test_unknown_names_get_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown format 'vqa2'; valid: \[.*'vqa'\]$"):
        formats.get("vqa2")
    with pytest.raises(ValueError, match=r"^unknown format 'vatex_caption'; valid: \["):
        builder.dataset_dir(str(tmp_path), "vatex_caption")  # read-only: no builder
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        prepare.prepare("nope", [], str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="snli_ve takes exactly one annotation file per split, "
                                         "got 2"):
        prepare.prepare("snli_ve", ["a.json", "b.json"], str(tmp_path), str(tmp_path / "out"))


TOY = '''
"""A toy format for the registry test: {"text": ...} records."""
import functools

from mplug_jax.data.formats import base

DESCRIPTION = "Toy sentences."
FEATURES = {"sentence": "text", "length": "int"}


def read(annotations, root="", *, max_skip_rate=0.01):
    """Records: sentence."""
    def parse(raw, pos):
        return [{"sentence": base.str_field(raw, "text")}]
    files = base.as_list(annotations)
    return base.build(base.items(files), parse, f"toy{files}", max_skip_rate)


def example(builder, record, source, index):
    return {"sentence": record["sentence"], "length": len(record["sentence"])}


def prepare_reader(split):
    return functools.partial(read, split.files, split.image_root,
                             max_skip_rate=split.max_skip_rate)
'''


def test_a_new_format_is_one_module(tmp_path, monkeypatch):
    """A module added next to the others is listed, readable and prepared by name."""
    extra = tmp_path / "extra_formats"
    extra.mkdir()
    (extra / "toy_sentences.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(extra)])
    monkeypatch.delitem(sys.modules, "mplug_jax.data.formats.toy_sentences", raising=False)
    try:
        assert "toy_sentences" in formats.available() and "toy_sentences" in formats.preparable()
        parser = argparse.ArgumentParser()
        prepare.add_prepare_args(parser)
        assert parser.parse_args(["--format", "toy_sentences", "--annotations", "a.json",
                                  "--image-root", "i", "--out", "o"]).format == "toy_sentences"
        ann = tmp_path / "toy.json"
        ann.write_text(json.dumps([{"text": "a cat"}, {"text": ""}, {"text": "two dogs"}]))
        src = formats.get("toy_sentences").read(str(ann), max_skip_rate=0.5)
        assert [r["sentence"] for r in src] == ["a cat", "two dogs"]
        assert src.skipped["bad_record"] == 1 and isinstance(src, base.RecordSource)
        report = prepare.prepare("toy_sentences", str(ann), str(tmp_path), str(tmp_path / "out"),
                                 max_skip_rate=0.5)
        assert report["splits"]["train"]["written"] == 2
        assert report["path"].endswith("mplug_toy_sentences/1.0.0")
        data = builder.load_prepared(str(tmp_path / "out"), "toy_sentences")["train"]
        assert sorted((r["sentence"], int(r["length"])) for r in data) == [
            (b"a cat", 5), (b"two dogs", 8)]
    finally:
        sys.modules.pop("mplug_jax.data.formats.toy_sentences", None)
