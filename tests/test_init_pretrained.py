"""Pretraining starts from unimodal CLIP + BERT checkpoints when `config.init` names them."""
import flax
import jax
import numpy as np
import pytest

from mplug_jax import trainer
from test_trainer import loop_config

torch = pytest.importorskip("torch", reason="torch extra not installed")
transformers = pytest.importorskip("transformers", reason="transformers not installed")


def test_state_initialised_from_clip_and_bert(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    cfg = loop_config()  # hidden 32, text 1 + fusion 2 layers, decoder 1, ViT 32 px / patch 16
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16))
    for name, module in (("b", bert), ("c", clip)):  # clone: tied tensors share memory
        save_file({k: v.clone().contiguous() for k, v in module.state_dict().items()},
                  str(tmp_path / f"{name}.safetensors"))
    cfg.init.update(clip=str(tmp_path / "c.safetensors"), bert=str(tmp_path / "b.safetensors"))
    s = trainer.setup(cfg, steps_per_epoch=1)
    fresh = trainer.init_state(s, cfg.seed)
    state = s.task.init_from_pretrained(fresh)
    flat = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    mom = flax.traverse_util.flatten_dict(jax.device_get(state.extra["params_m"]), sep="/")
    word = bert.state_dict()["bert.embeddings.word_embeddings.weight"].numpy()
    np.testing.assert_array_equal(flat["text/embeddings/word/embedding"], word)
    np.testing.assert_array_equal(flat["decoder/embeddings/word/embedding"], word)
    np.testing.assert_array_equal(mom["text/embeddings/word/embedding"], word)
    fc2 = bert.state_dict()["bert.encoder.layer.2.output.dense.weight"].numpy()
    # fusion layer 1 (connected, stride 1) <- BERT layer 2 (after the 1 text-encoder layer)
    np.testing.assert_array_equal(flat["fusion/layer_1/joint/mlp/fc2/kernel"], fc2.T)
    cls = clip.state_dict()["embeddings.class_embedding"].numpy()
    np.testing.assert_array_equal(flat["vision/cls_token"], cls)
    fresh_flat = flax.traverse_util.flatten_dict(jax.device_get(fresh.params), sep="/")
    np.testing.assert_array_equal(flat["itm_head/kernel"], fresh_flat["itm_head/kernel"])
    # a run with init set starts from these weights and trains
    cfg.total_steps = 1
    out = trainer.run(cfg, str(tmp_path / "run"))
    assert out["stopped"] == "done"
