"""Pretraining on official-format json annotations with real image files (not the built-in set)."""
import json

import numpy as np
import pytest
from PIL import Image

from mplug_jax import trainer
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
        trainer.make_source(cfg.input, "train", 4, 32, 0)
    cfg.input.dataset = "json"
    with pytest.raises(ValueError, match="eval_annotations"):
        trainer.make_source(cfg.input, "heldout", 4, 32, 0)
    assert np.isfinite(len(trainer.make_source(cfg.input, "train", 4, 32, 0)))
