"""Pretraining on official-format json annotations with real image files (not the built-in set)."""
import json

import numpy as np
import pytest
from PIL import Image

from mplug_jax import trainer
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from test_trainer import loop_config

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")


def test_pretraining_reads_official_json_lists(tmp_path):
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(),
              skimage_data.rocket()]
    records = []
    for i in range(16):
        name = f"img{i}.jpg"
        Image.fromarray(photos[i % 4]).resize((48, 40)).save(tmp_path / name)
        caption = ["a photo number %d" % i, "another caption"] if i % 2 else "a picture"
        records.append({"image": name, "caption": caption})
    (tmp_path / "train.json").write_text(json.dumps(records))
    cfg = loop_config()
    cfg.input.dataset = "json"
    cfg.input.annotations = [str(tmp_path / "train.json")]
    cfg.input.image_root = str(tmp_path)
    cfg.total_steps = 2
    out = trainer.run(cfg, str(tmp_path / "run"))
    assert out["stopped"] == "done" and out["step"] == 2
    cfg.input.dataset = "parquet"
    with pytest.raises(ValueError, match="valid: synthetic, json, tfds"):
        pretrain_input.source(cfg.input, "train", 4, 32, 0)
    cfg.input.dataset = "json"
    with pytest.raises(ValueError, match="eval_annotations"):
        pretrain_input.source(cfg.input, "heldout", 4, 32, 0)
    src = pretrain_input.source(cfg.input, "train", 4, 32, 0)
    assert len(src) == 16 and not any(src.skipped.values())
    assert src[0] == {"image": str(tmp_path / "img0.jpg"), "caption": "a picture"}
    assert src[1] == {"image": str(tmp_path / "img1.jpg"),
                      "caption": ["a photo number 1", "another caption"]}
    batch = next(iter(pretrain_input.dataset(src, image_size=32, batch_size=4, train=False,
                                                max_tokens=16)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["idx"].tolist() == [0, 1, 2, 3]
    for i in range(4):  # each record's own photo, through the official test transform
        want = transforms.load_image(str(tmp_path / f"img{i}.jpg"), 32)
        np.testing.assert_allclose(batch["image"][i], want, atol=1e-5)
    assert np.abs(batch["image"][0] - batch["image"][1]).mean() > 0.1
    ids, mask = tokenizer.get_tokenizer().encode(["a picture"], max_length=16, pad_to=16)
    assert batch["text_ids"][0].tolist() == ids[0].tolist()
    assert batch["text_mask"][0].tolist() == mask[0].tolist()
