"""The parity checker handles every fixture variant of docs/fixtures.md: caption task, large-style
vision (visn_fc), unused leading fusion modules, several answers per question, padded questions
and grayscale photos. The fixture here is written in the official format from a random model
(self-consistency of the harness; agreement with the official code is tested on ../shared)."""
import json

import jax
import numpy as np
import pytest
import yaml
from PIL import Image

from mplug_jax import params as P
from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.data.ops.image import load_image
from mplug_jax.interop import convert, official_config
from mplug_jax.parity import run_parity
from mplug_jax.parity.vqa_caption import official_forward
from mplug_jax.models.mplug import MPLUG

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")


def write_fixture(root, task: str, large: bool):
    cfg = dict(hidden_size=64, num_heads=2, mlp_dim=128, text_layers=1, fusion_layers=3,
               fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16,
               vision_width=96 if large else 64, vision_layers=1, vision_heads=1, embed_dim=16)
    model = MPLUG.from_config(cfg)
    params = P.init_params(model, jax.random.PRNGKey(7))
    state = convert.export_official(params, model, start_layer=2)
    for name in ("vision_proj", "text_proj", "itm_head"):  # task checkpoints lack the heads
        state = {k: v for k, v in state.items() if not k.startswith(name)}
    state = {k: v for k, v in state.items()
             if not k.startswith(("temp", "text_encoder.cls"))}
    bert, yml = official_config.official_config_files(convert.model_kwargs(model), start_layer=2)
    yml["clip_tiny"] = {"vision_heads": 1}
    (root / "images").mkdir(parents=True)
    Image.fromarray(skimage_data.camera()).save(root / "images" / "camera.png")  # grayscale
    Image.fromarray(skimage_data.astronaut()).save(root / "images" / "astronaut.png")
    files = ["images/camera.png", "images/astronaut.png"]
    image = np.stack([load_image(str(root / f), 32).transpose(2, 0, 1) for f in files])
    tok = get_tokenizer()
    questions = ["What is the man holding?", "Who is this?"]
    answers = ["a camera[SEP]", "camera[SEP]", "an astronaut[SEP]"]
    q_ids, q_mask = tok.encode(questions, max_length=25)
    a_ids, a_mask = tok.encode(answers)
    inputs = dict(image=image, text_input_ids=q_ids.astype(np.int64),
                  text_attention_mask=q_mask.astype(np.int64),
                  target_input_ids=a_ids.astype(np.int64),
                  target_attention_mask=a_mask.astype(np.int64),
                  target_labels=np.where(a_ids == 0, -100, a_ids).astype(np.int64),
                  k=np.array([2, 1]), weights=np.array([0.6, 0.4, 1.0], np.float32))
    if task == "caption":
        inputs = {k: v for k, v in inputs.items() if k not in ("k", "weights")}
        for k in ("target_input_ids", "target_attention_mask", "target_labels"):
            inputs[k] = inputs[k][:2]
    with jax.default_matmul_precision("highest"):
        expected = official_forward(model, params, inputs, task)
    np.savez(root / "inputs.npz", **inputs)
    np.savez(root / "expected.npz", **expected)
    from safetensors.numpy import save_file
    save_file(state, str(root / "model.safetensors"))
    (root / "config_bert.json").write_text(json.dumps(bert))
    (root / "config.yaml").write_text(yaml.safe_dump(yml))
    text = {"questions": [{"raw": q, "fed_to_tokenizer": q, "input_ids": ids[m > 0].tolist()}
                          for q, ids, m in zip(questions, q_ids, q_mask)],
            "tokenizer_calls": {"question": "tokenizer(q, max_length=25)"}}
    (root / "text.json").write_text(json.dumps(text))
    meta = {"task": task, "images": [{"file": f} for f in files],
            "float64_check": {"suggested_atol": {k: 1e-5 for k in expected}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return expected


@pytest.mark.parametrize("task,large", [("vqa", True), ("caption", False), ("caption", True)])
def test_parity_harness_on_fixture_variants(tmp_path, task, large):
    expected = write_fixture(tmp_path, task, large)
    assert ("visual_ln_post" in expected) == large
    assert ("answer_nll" in expected) == (task == "vqa")
    rows = run_parity(str(tmp_path))
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert expected["image_embeds"].shape == (2, 5, 64)

    bad = dict(np.load(tmp_path / "expected.npz"))
    bad["fusion_text"] = bad["fusion_text"] + 1e-3
    np.savez(tmp_path / "expected.npz", **bad)
    failed = {r.name for r in run_parity(str(tmp_path)) if not r.ok}
    assert failed == {"fusion_text"}
