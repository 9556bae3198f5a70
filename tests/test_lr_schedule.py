"""The official mPLUG fine-tuning schedule ('epoch_cosine') against values worked out by hand,
which presets use it, its wiring through the trainer, and `mplug-jax schedule` (JSON + PNG).

By hand (official loop: the scheduler moves to stair i // 100 after the optimizer step of
micro-batch i, i = 0, 100, ..., 100 * warmup_epochs; epoch e >= 1 holds
min_lr + (peak - min_lr) * (1 + cos(pi * e / epochs)) / 2):
  VQA base, 1 micro-batch per update, warmup_lr 1e-5, 4 stairs, peaks 3e-5 / 5e-6:
    updates 0..100 -> 1e-5 / 1e-5; 101..200 -> 1.5e-5 / 8.75e-6; 201..300 -> 2e-5 / 7.5e-6;
    301..400 -> 2.5e-5 / 6.25e-6; 401.. -> 3e-5 / 5e-6 (rest of epoch 0);
    epoch 1: 1e-6 + 29e-6 * 0.96193977 = 2.88962533e-5 / 1e-6 + 4e-6 * 0.96193977 = 4.84775906e-6;
    epoch 7 (last of 8): 1e-6 + 29e-6 * 0.03806023 = 2.10374667e-6 / 1.15224093e-6.
  Caption base CE, 4 micro-batches per update: stairs change at updates 25, 50, 75, 100 (the
    update holding micro-batches 100..103 follows the scheduler call after micro-batch 100).
"""
import json
import math

import pytest

from configs import caption as caption_config
from configs import grounding as grounding_config
from configs.mplug2 import video_qa as m2qa_config
from configs import nlvr2 as nlvr2_config
from configs import retrieval as retrieval_config
from configs import snli_ve as snli_config
from configs import vqa as vqa_config
from mplug_jax import cli, optim, trainer


def _values(optim_cfg, total_steps, steps_per_epoch, steps):
    s = optim.make_schedules(optim_cfg, total_steps, steps_per_epoch)
    return {g: [float(f(u)) for u in steps] for g, f in s.items()}


def test_vqa_base_by_hand():
    steps = [0, 100, 101, 200, 201, 300, 301, 400, 401, 999, 1000, 1999, 7000, 7999]
    got = _values(vqa_config.get_config("base").optim, 8000, 1000, steps)
    base = [1e-5, 1e-5, 1.5e-5, 1.5e-5, 2e-5, 2e-5, 2.5e-5, 2.5e-5, 3e-5, 3e-5,
            2.88962533e-5, 2.88962533e-5, 2.10374667e-6, 2.10374667e-6]
    vision = [1e-5, 1e-5, 8.75e-6, 8.75e-6, 7.5e-6, 7.5e-6, 6.25e-6, 6.25e-6, 5e-6, 5e-6,
              4.84775906e-6, 4.84775906e-6, 1.15224093e-6, 1.15224093e-6]
    assert got["base"] == pytest.approx(base, rel=1e-5)
    assert got["vision"] == pytest.approx(vision, rel=1e-5)  # warms *down* from 1e-5


def test_accumulation_counts_microbatches():
    """Caption CE (accumulation 4): the vision group (5e-6) warms down in stairs that change
    every 25 updates; the base group's peak equals warmup_lr (1e-5), so it stays flat."""
    cfg = caption_config.get_config("base").optim
    assert cfg.accum_steps == 4
    steps = [0, 24, 25, 49, 50, 74, 75, 99, 100, 499, 500]
    got = _values(cfg, 2500, 500, steps)
    assert got["vision"] == pytest.approx(
        [1e-5, 1e-5, 8.75e-6, 8.75e-6, 7.5e-6, 7.5e-6, 6.25e-6, 6.25e-6, 5e-6, 5e-6,
         1e-6 + 4e-6 * 0.9045085], rel=1e-5)  # epoch 1 of 5: (1 + cos(pi / 5)) / 2
    assert got["base"] == pytest.approx([1e-5] * 10 + [1e-6 + 9e-6 * 0.9045085], rel=1e-5)
    # 2 micro-batches per update: update 49 = micro-batches 98, 99; update 50 = 100, 101.
    cfg.accum_steps = 2
    assert _values(cfg, 2500, 500, [49, 50])["vision"] == pytest.approx([1e-5, 8.75e-6])


def test_scst_starts_ten_times_its_peak_and_retrieval_one_stair():
    got = _values(caption_config.get_config("base,mode=scst").optim, 5000, 1000,
                  [0, 100, 101, 201, 301, 401, 4000])
    last = 8e-8 + 9.2e-7 * 0.0954915  # epoch 4 of 5: (1 + cos(4 pi / 5)) / 2
    for g in ("base", "vision"):
        assert got[g] == pytest.approx([1e-5, 1e-5, 7.75e-6, 5.5e-6, 3.25e-6, 1e-6, last],
                                       rel=1e-5)
    got = _values(retrieval_config.get_config("coco_large").optim, 8000, 1000, [100, 101])
    assert got["base"] == pytest.approx([1e-5, 1e-5])
    assert got["vision"] == pytest.approx([1e-5, 2e-6])


def test_warmup_longer_than_epoch_zero_is_cut():
    """Grounding: 20 stairs (2000 batches) but a 1500-update epoch: epoch 0 ends at stair 14,
    epoch 1 holds the cosine value of epoch 1 of 120."""
    got = _values(grounding_config.get_config("refcoco_large").optim, 120 * 1500, 1500,
                  [1499, 1500])
    cos1 = (1 + math.cos(math.pi / 120)) / 2
    assert got["base"] == pytest.approx([1e-6 + 14 * 19e-6 / 20, 1e-6 + 19e-6 * cos1], rel=1e-5)


def test_presets():
    """Official base / large fine-tuning presets use the official schedule; tiny presets and
    the tasks without an official stair schedule keep ours; `schedule=cosine` is ours again."""
    official = [vqa_config.get_config("base"), vqa_config.get_config("large"),
                caption_config.get_config("large"), caption_config.get_config("large,mode=scst"),
                retrieval_config.get_config("flickr_base"),
                grounding_config.get_config("vg_uni_base")]
    assert all(c.optim.schedule == "epoch_cosine" for c in official)
    ours = [vqa_config.get_config("tiny"), caption_config.get_config("tiny"),
            retrieval_config.get_config("tiny"), grounding_config.get_config("tiny"),
            nlvr2_config.get_config("base"), snli_config.get_config("base"),
            m2qa_config.get_config("large"), vqa_config.get_config("base,mode=smoke")]
    assert all(c.optim.schedule == "cosine" for c in ours)
    cfg = vqa_config.get_config("base").optim
    cfg.schedule = "cosine"
    got = _values(cfg, 8000, 1000, [0, 200, 400])
    assert got["base"] == pytest.approx([0.0, 1.5e-5, 3e-5])


def test_errors():
    cfg = vqa_config.get_config("base").optim
    with pytest.raises(ValueError, match="needs the optimizer updates per epoch"):
        optim.make_schedules(cfg, 100)
    cfg.schedule = "stairs"
    with pytest.raises(ValueError, match="unknown schedule optim.schedule='stairs'; valid: "
                                         "cosine, constant, epoch_cosine"):
        optim.make_schedules(cfg, 100, 10)


def test_trainer_passes_steps_per_epoch():
    """trainer.setup builds the schedule with its steps per epoch (7 updates, 3 epochs)."""
    c = vqa_config.get_config("tiny,mode=smoke")
    c.model.update(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1, fusion_layers=2,
                   fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16,
                   vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16)
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.total_steps, c.total_epochs = 0, 3.0
    c.optim.update(schedule="epoch_cosine", lr=3e-4, warmup_lr=1e-4, warmup_stairs=2,
                   stair_microbatches=2, end_lr=0.0)
    s = trainer.setup(c, steps_per_epoch=7)
    assert s.total_steps == 21
    got = [float(s.schedules["base"](u)) for u in (0, 2, 3, 4, 5, 6, 7, 14)]
    assert got == pytest.approx([1e-4, 1e-4, 2e-4, 2e-4, 3e-4, 3e-4, 2.25e-4, 0.75e-4], rel=1e-5)


def test_cli_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "lr" / "caption.json"
    rc = cli.main(["schedule", "--config", "configs/caption.py:base", "--steps-per-epoch", "120",
                   "--out", str(out)])
    assert rc == 0
    table = json.loads(out.read_text())
    assert sorted(table) == ["base", "vision"] and len(table["vision"]) == 600  # 5 epochs
    assert table["vision"][24:26] == pytest.approx([1e-5, 8.75e-6])
    assert table["vision"][100] == pytest.approx(5e-6)
    assert (tmp_path / "lr" / "caption.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "caption.png" in capsys.readouterr().out
    rc = cli.main(["schedule", "--config", "configs/caption.py:base", "--steps-per-epoch", "30",
                   "--out", str(out), "--config.optim.schedule=linear"])
    assert rc == 2
    assert "error: unknown schedule optim.schedule='linear'" in capsys.readouterr().err
