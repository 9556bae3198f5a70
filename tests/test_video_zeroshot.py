"""Zero-shot video tasks (paper 5.4.2): frame sampling and padding, skipped videos, the video
ITC embedding of repeated frames, the three evaluators end to end on synthetic videos from the
`pretrain_workdir` checkpoint, configs, prompt stripping and the video QA score file."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import video_zeroshot
from mplug_jax import cli, tasks, workdir
from mplug_jax.data.formats import msrvtt_retrieval as msrvtt_retrieval_format
from mplug_jax.data.formats import vatex_caption as vatex_caption_format
from mplug_jax.data.formats import video_qa as video_qa_format
from mplug_jax.data.synthetic import video as synthetic_video
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops import video
from mplug_jax.data.inputs import video_zeroshot as video_input
from mplug_jax.evaluators import video_caption, video_retrieval
from mplug_jax.scoring import video_qa as S
from test_evaluate_cli import MODEL  # the pretrain_workdir model (test_trainer.loop_config)
from test_trainer import loop_config


def _frame_folder(path, n: int, size: int = 16):
    """n frames whose pixel value encodes their index (frame i: gray level 10 * i)."""
    os.makedirs(path)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 10 * i, np.uint8)).save(
            os.path.join(path, f"frame_{i:04d}.png"))
    return str(path)


def _gray_level(clip: np.ndarray) -> np.ndarray:
    """Per frame of float32[T, R, R, 3] (CLIP-normalised): the gray level 0..255."""
    x = clip[:, 0, 0, 0] * transforms.CLIP_STD[0] + transforms.CLIP_MEAN[0]
    return np.round(x * 255).astype(int)


def test_uniform_sampling_picks_segment_middles(tmp_path):
    folder = _frame_folder(tmp_path / "v", 24)
    picks, _ = video.sample_frames(folder, 8)
    assert picks == [1, 4, 7, 10, 13, 16, 19, 22]  # middles of the 8 segments of 3 frames
    clip = video_input.load_clip(folder, 8, 8)
    assert clip.shape == (8, 8, 8, 3) and clip.dtype == np.float32
    np.testing.assert_array_equal(_gray_level(clip), 10 * np.array(picks))


def test_short_video_is_padded_with_its_last_frame(tmp_path):
    folder = _frame_folder(tmp_path / "v", 3)
    assert video.sample_frames(folder, 8)[0] == [0, 1, 2, 2, 2, 2, 2, 2]
    np.testing.assert_array_equal(_gray_level(video_input.load_clip(folder, 8, 8)),
                                  [0, 10, 20, 20, 20, 20, 20, 20])


def test_undecodable_videos_are_skipped_and_counted(tmp_path):
    good = _frame_folder(tmp_path / "good", 5)
    os.makedirs(tmp_path / "no_frames")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(2000))
    recs = [{"video": good, "video_id": "good", "question": "what?"},
            {"video": str(tmp_path / "no_frames"), "video_id": "no_frames", "question": "a"},
            {"video": str(tmp_path / "empty.mp4"), "video_id": "empty", "question": "b"},
            {"video": str(tmp_path / "missing.mp4"), "video_id": "missing", "question": "c"},
            {"video": good, "video_id": "good2", "question": "how many?"}]
    try:
        import av  # noqa: F401
        recs.insert(3, {"video": str(tmp_path / "garbage.mp4"), "video_id": "garbage",
                        "question": "d"})
    except ImportError:
        pass
    ev = video_input.VideoEval(recs, num_frames=4, image_size=8, batch_size=2,
                               text_fields={"question": 6}, workers=2)
    for _ in range(2):  # a second pass counts afresh
        batches = list(ev)
        assert len(batches) == 1 and list(batches[0]["idx"]) == [0, len(recs) - 1]
        assert batches[0]["frames"].shape == (2, 4, 8, 8, 3)
        assert batches[0]["question_ids"].shape == (2, 6) and batches[0]["valid"].all()
        bad = len(recs) - 2
        assert ev.num_skipped == bad
        assert ev.skipped["missing_file"] == 1 and ev.skipped["empty_file"] == 1
        assert ev.skipped["bad_image"] == bad - 2
        assert sorted(ev.skipped_ids) == sorted(r["video_id"] for r in recs[1:-1])


def test_video_of_copies_of_an_image_has_the_image_embedding():
    task = tasks.build(loop_config())
    params = jax.jit(lambda k: nn.meta.unbox(task.init_params(k)))(jax.random.PRNGKey(0))
    fns = task.predict_fns()
    image = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    frames = np.repeat(image[:, None], 4, 1)  # 4 copies of each image
    img_emb, img_states = jax.jit(fns["image_embed"])(params, image)
    vid_emb, vid_states = jax.jit(video_retrieval.video_embed_fn(fns["image_embed"]))(params,
                                                                                     frames)
    np.testing.assert_allclose(vid_emb, img_emb, atol=1e-6)
    n = img_states.shape[1]
    assert vid_states.shape == (2, 4 * n, img_states.shape[2])
    # The frames' tokens concatenated (up to float32 rounding of another batch size).
    np.testing.assert_allclose(vid_states, np.tile(img_states, (1, 4, 1)), atol=1e-5)


def test_configs_name_the_checkpoint_task():
    for bench, task in (("msrvtt_retrieval", "pretrain"), ("msrvtt_qa", "vqa"),
                        ("msvd_qa", "vqa"), ("vatex_caption", "caption")):
        for size in ("tiny", "base", "large"):
            c = video_zeroshot.get_config(f"{bench},size={size}")
            assert c.task.name == task and list(c.evals) == [bench]
            assert (c.evals[bench].dataset == "synthetic") == (size == "tiny")
    c = video_zeroshot.get_config("vatex_caption")
    assert c.task.zero_shot_prompt == "a video of" and c.model.image_size == 448
    assert c.task.generation.beam_size == 10 and c.task.generation.min_length == 15
    c = video_zeroshot.get_config("msrvtt_retrieval,task=retrieval")
    assert c.task.name == "retrieval" and c.evals.msrvtt_retrieval.k_test == 128
    assert video_zeroshot.get_config("msvd_qa").evals.msvd_qa.num_frames == 16
    with pytest.raises(ValueError, match="unknown video benchmark"):
        video_zeroshot.get_config("ucf101")
    with pytest.raises(ValueError, match="reads a checkpoint of task vqa"):
        video_zeroshot.get_config("msrvtt_qa,task=caption")


def test_strip_official_prompts():
    s = video_caption.strip_prompts
    assert s("a video of a man cooking") == "a man cooking"
    assert s("a video clip of a dog") == "a dog" and s("a video showing cats") == "cats"
    assert s("a picture of a cat") == "a cat" and s("a videos of x") == "a videos of x"


def _tiny_config(bench: str, tmp_path, **block):
    c = video_zeroshot.get_config(f"{bench},size=tiny")
    c.model.update(MODEL)
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.evals[bench].update(dict(synthetic_size=6, synthetic_image_size=32, batch_size=4,
                               synthetic_dir=str(tmp_path / "videos"), workers=2), **block)
    return c


def _task_and_params(config, pretrain_workdir):
    task = tasks.build(config)
    _, params, _ = workdir.restore_params(pretrain_workdir)
    return task, params


def test_video_qa_end_to_end_through_the_cli(pretrain_workdir, tmp_path, capsys):
    """`mplug-jax evaluate` of the msrvtt_qa config on a pretraining workdir, loaded by the VQA
    task (same parameter tree: VQA fine-tuning starts from exactly these arrays)."""
    ov = [f"--config.model.{k}={v}" for k, v in MODEL.items()]
    ov += ["--config.mesh.shape.data=1", "--config.evals.msrvtt_qa.synthetic_size=5",
           "--config.evals.msrvtt_qa.batch_size=4", "--config.evals.msrvtt_qa.workers=2",
           "--config.evals.msrvtt_qa.synthetic_image_size=32",
           f"--config.evals.msrvtt_qa.synthetic_dir={tmp_path / 'videos'}"]
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--config=configs/video_zeroshot.py:msrvtt_qa,size=tiny",
                     "--checkpoint", str(pretrain_workdir), "--out", str(out), *ov]) == 0
    assert "video QA: exact-match accuracy" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())["msrvtt_qa"]
    assert m["num_questions"] == 10 and m["num_skipped_videos"] == 0  # 5 videos x 2 questions
    result = out / "msrvtt_qa" / S.RESULT_FILE
    rows = json.loads(result.read_text())
    assert sorted(r["question_id"] for r in rows) == list(range(10))
    ann = str(tmp_path / "videos" / "msrvtt_qa.jsonl")
    assert S.score_file(str(result), ann)["acc"] == m["acc"]
    assert cli.main(["score", "--task", "video_qa", "--results", str(result),
                     "--annotations", ann]) == 0


def test_video_retrieval_end_to_end_skips_and_counts_a_bad_video(pretrain_workdir, tmp_path):
    cfg = _tiny_config("msrvtt_retrieval", tmp_path, dataset="json", k_test=4)
    paths = synthetic_video.write_video_files(str(tmp_path / "videos"), 6, num_frames=8,
                                              image_size=32, mp4=False)
    with open(paths["msrvtt_retrieval"], "a") as f:  # a 7th video whose file is missing
        f.write(json.dumps({"clip_name": "gone", "caption": "a red circle moving up"}) + "\n")
    cfg.evals.msrvtt_retrieval.update(annotations=paths["msrvtt_retrieval"],
                                      video_root=paths["frames_root"])
    task, params = _task_and_params(cfg, pretrain_workdir)
    ev = video_retrieval.Evaluator(task.predict_fns(), cfg.evals.msrvtt_retrieval, cfg)
    res = ev.run(params)
    assert res["num_videos"] == 6 and res["num_skipped_videos"] == 1
    assert res["k_test_t2v"] == 4
    for k in ("vid_r1", "vid_r5", "vid_r10", "txt_r1", "r_mean"):
        assert 0.0 <= res[k] <= 100.0
    assert res["vid_r10"] == 100.0 and 1.0 <= res["vid_mdR"] <= 6.0
    out = res["files"][video_retrieval.RESULT_FILE]
    assert len(out["t2i"]) == 6 and out["t2i"][0]["text"] == "heldout_video0#0"
    assert "gone" not in {v for q in out["t2i"] for v in q["images"]}
    again = ev.run(params)  # deterministic
    assert {k: again[k] for k in ("vid_r1", "txt_r1", "vid_mdR")} == \
        {k: res[k] for k in ("vid_r1", "txt_r1", "vid_mdR")}
    print("video retrieval (2 training steps, 6 videos):", video_retrieval.Evaluator.report(res))


def test_video_caption_end_to_end(pretrain_workdir, tmp_path):
    cfg = _tiny_config("vatex_caption", tmp_path, metrics=("Bleu_1", "CIDEr"),
                       tokenize="simple", synthetic_video="mp4" if _has_av() else "frames")
    cfg.task.generation.update(beam_size=2, max_length=6)
    task, params = _task_and_params(cfg, pretrain_workdir)
    assert task.zero_shot_prompt == "a video of"
    ev = video_caption.Evaluator(task.predict_fns(), cfg.evals.vatex_caption, cfg)
    res = ev.run(params)
    assert res["num_videos"] == 6 and res["num_skipped_videos"] == 0
    assert 0.0 <= res["Bleu_1"] <= 1.0 and res["CIDEr"] >= 0.0
    sub = res["files"][video_caption.SUBMISSION_FILE]
    vatex = json.loads((tmp_path / "videos" / "vatex.json").read_text())
    assert sorted(sub) == sorted(r["videoID"] for r in vatex)
    rows = res["files"]["caption_results.json"]
    assert [r["question_id"] for r in rows] == [r["videoID"] for r in vatex]
    assert rows[0]["gold_caption"] == vatex[0]["enCap"]
    assert all(not c.startswith("a video of ") for c in sub.values())


def _has_av() -> bool:
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


def test_official_readers_and_score_file_round_trip(tmp_path):
    paths = synthetic_video.write_video_files(str(tmp_path), 3, num_frames=4, image_size=16,
                                              mp4=False, qa_per_video=2)
    ret = msrvtt_retrieval_format.read(paths["msrvtt_retrieval"], paths["frames_root"])
    assert [r["video_id"] for r in ret] == paths["video_ids"]
    assert os.path.isdir(ret[0]["video"])
    vatex = vatex_caption_format.read(paths["vatex"], paths["frames_root"])
    assert len(vatex[0]["gold_captions"]) == 5
    qa = video_qa_format.read(paths["msrvtt_qa"], paths["frames_root"])
    assert [r["question_id"] for r in qa] == list(range(6))
    preds = [{"question_id": r["question_id"], "answer": r["answer"] if i % 3 else "nope"}
             for i, r in enumerate(qa)]
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps(preds[:5]))
    got = S.score_file(str(res_path), paths["msrvtt_qa"])
    assert got == {"acc": 3 / 5, "num_questions": 5, "num_unanswered": 1}
    res_path.write_text(json.dumps([{"question_id": 99, "answer": "x"}]))
    with pytest.raises(ValueError, match="not in the annotations"):
        S.score_file(str(res_path), paths["msrvtt_qa"])
    answers = set(synthetic_video.answer_vocabulary())
    assert {r["answer"] for r in qa} <= answers
