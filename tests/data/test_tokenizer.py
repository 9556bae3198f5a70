import hashlib
import json

import numpy as np
import pytest

from conftest import fixture_dirs
from mplug_jax.data import text, tokenizer, transforms


def test_vocab_shipped_and_special_ids():
    tok = tokenizer.get_tokenizer()
    assert tok.vocab_size == 30522
    ids, mask = tok.encode(["a photo[SEP]"])
    assert ids[0].tolist() == [101, 1037, 6302, 102]
    assert mask[0].tolist() == [1, 1, 1, 1]


def test_padding_truncation_and_decode():
    tok = tokenizer.get_tokenizer()
    ids, mask = tok.encode(["a red square", "hi"], max_length=3)
    assert ids.shape == (2, 3) and ids[1, 2] == 0 and mask[1].tolist() == [1, 1, 0]
    full, _ = tok.encode(["a red square[SEP]"])
    assert tok.decode(full[0]) == "a red square"


def test_bad_text_inputs():
    tok = tokenizer.get_tokenizer()
    with pytest.raises(TypeError, match="not a string"):
        tok.encode(["ok", None])
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode("just one")
    with pytest.raises(ValueError, match="pad_to"):
        tok.encode(["one two three four"], pad_to=2)


def test_pre_caption_rules():
    assert text.pre_caption("A  <person>'s DOG-house, (big)!  ") == "a persons dog house big"
    assert text.pre_caption("one two three", max_words=2) == "one two"
    assert text.pre_question("What's up-town?  ") == "whats up town"


@pytest.mark.parametrize("fx", fixture_dirs(), ids=lambda p: p.name)
def test_fixture_text_and_images(fx):
    t = json.loads((fx / "text.json").read_text())
    tok = tokenizer.get_tokenizer()
    for q in t.get("questions", []):
        assert text.pre_question(q["raw"]) == q["pre_question"]
        ids, _ = tok.encode([q["fed_to_tokenizer"]], max_length=25)
        assert ids[0].tolist() == q["input_ids"]
    for a in t.get("answers", []):
        ids, _ = tok.encode([a["fed_to_tokenizer"]])
        assert ids[0].tolist() == a["input_ids"]
    inputs = np.load(fx / "inputs.npz")
    res = inputs["image"].shape[-1]
    meta = json.loads((fx / "meta.json").read_text())
    for i, entry in enumerate(meta["images"]):
        got = transforms.load_image(str(fx / entry["file"]), res).transpose(2, 0, 1)
        np.testing.assert_allclose(got, inputs["image"][i], atol=1e-5)


def test_fixtures_tokenized_with_the_shipped_vocab():
    """Every parity fixture has the files the test above reads and was tokenized with the very
    vocab.txt this package ships (otherwise its input ids would not be comparable)."""
    if not fixture_dirs():
        pytest.skip("../shared/fixtures not present: official parity fixtures skipped")
    with open(tokenizer.vocab_path(), "rb") as f:
        shipped = hashlib.sha256(f.read()).hexdigest()
    for fx in fixture_dirs():
        assert {"text.json", "inputs.npz", "meta.json"} <= {p.name for p in fx.iterdir()}, fx
        t = json.loads((fx / "text.json").read_text())
        assert t["vocab_sha256"] == shipped, fx.name
        assert t.get("questions") or t.get("answers"), f"{fx.name}: no tokenized text"
