import hashlib
import json

import numpy as np
import pytest

from conftest import fixture_dirs
from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms


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


def test_decode_official_consequences():
    """docs/fixtures.md#post-processing: ##x glues onto [CLS], an inner [SEP] leaves two spaces and
    keeps what follows, [unusedN] stays, clean-up of punctuation / contractions, [PAD] dropped."""
    tok = tokenizer.get_tokenizer()
    ids = lambda *words: [tok.token_to_id(w) for w in words]  # noqa: E731
    assert tok.decode_official(ids("[CLS]", "##ption", "spirited", "[SEP]")) == "ption spirited"
    assert tok.decode_official(ids("[CLS]", "a", "dog", "[SEP]", "runs", "[SEP]")) == \
        "a dog  runs"
    assert tok.decode_official(ids("[CLS]", "[unused3]", "dog", "[SEP]")) == "[unused3] dog"
    assert tok.decode_official(ids("[CLS]", "it", "isn", "'", "t", "a", "dog", ".", "[SEP]",
                                   "[PAD]")) == "it isn't a dog."
    assert tok.decode_official(ids("[CLS]", "what", "?", "yes", ",", "don", "'", "s")) == \
        "what? yes, don's"
    assert tok.decode(ids("[CLS]", "a", "dog", "[SEP]", "runs", "[SEP]")) == "a dog"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode_official([101, 30522])


@pytest.mark.parametrize("fx", [f for f in fixture_dirs() if (f / "generation.json").is_file()],
                         ids=lambda p: p.name)
def test_decode_official_matches_the_fixture_texts(fx):
    g = json.loads((fx / "generation.json").read_text())
    tok = tokenizer.get_tokenizer()
    n = 0
    for run in g["runs"].values():
        for ex in run["examples"]:
            answer = ex.get("official_answer", ex.get("official_caption"))
            assert tok.decode_official(ex["nbest"][0]["ids"]) == answer
            for h in ex["nbest"] + ex["stored_hypotheses_in_insertion_order"]:
                assert tok.decode_official(h["ids"]) == h["text"], h
                n += 1
    assert n >= 20 and any("  " in h["text"] for r in g["runs"].values()
                           for e in r["examples"] for h in e["nbest"])
