"""`Predictor` / `mplug-jax predict`: checkpoints of each task, real photos, bad inputs."""
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from mplug_jax import cli
from mplug_jax.predict import Predictor, Settings


@pytest.fixture(scope="module")
def zero_shot(pretrain_workdir):
    """Zero-shot captioner from the 2-step pretraining workdir (short search: fast tests)."""
    return Predictor.from_checkpoint(pretrain_workdir, task="caption", min_length=2,
                                     max_length=4, beam_size=2)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photo (skimage's astronaut) as a JPEG file, and a grayscale PNG of it."""
    from skimage import data
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(d / "astronaut.jpg")
    Image.fromarray(data.camera()).save(d / "camera.png")  # mode L
    return d


def test_zero_shot_captions_from_a_pretraining_workdir(zero_shot, photo):
    assert zero_shot.prompt == "a picture of" and zero_shot.task == "caption"
    caps = zero_shot.caption([photo / "astronaut.jpg", photo / "camera.png"])
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)
    # Same input, same caption; an array input equals the file it came from.
    arr = np.asarray(Image.open(photo / "astronaut.jpg"))
    assert zero_shot(arr) == caps[0]


def test_search_uses_the_settings(zero_shot, photo):
    """The predictor's ids are beam search's top-1 with its settings (max_length 4 tokens)."""
    text = zero_shot(photo / "astronaut.jpg")
    assert len(zero_shot.tokenizer.encode([text])[0][0]) - 1 <= 4


def test_bad_inputs_give_clear_errors(zero_shot, photo, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg does not exist"):
        zero_shot(tmp_path / "nope.jpg")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot use image .*notes.jpg.*not a recognised image"):
        zero_shot(bad)
    small = Predictor(zero_shot.model, zero_shot.params, "caption", prompt="a picture of",
                      settings=zero_shot.settings, max_pixels=1000)
    with pytest.raises(ValueError, match="exceeds max_pixels=1000"):
        small(photo / "camera.png")
    with pytest.raises(ValueError, match="takes no question"):
        zero_shot(photo / "camera.png", "what?")
    with pytest.raises(ValueError, match="load a VQA checkpoint"):
        zero_shot.answer([photo / "camera.png"], ["what?"])
    with pytest.raises(ValueError, match="question 0 is empty"):
        zero_shot.encode_texts(["  "], "question")
    with pytest.raises(ValueError, match="has 601 tokens; the text encoder takes at most 512"):
        zero_shot.encode_texts(["a " * 600], "question")


def test_checkpoint_errors(pretrain_workdir, tmp_path):
    with pytest.raises(ValueError, match="pretraining workdir.*for VQA fine-tune it first"):
        Predictor.from_checkpoint(pretrain_workdir, task="vqa")
    with pytest.raises(ValueError, match="pretraining workdir"):
        Predictor.from_checkpoint(pretrain_workdir)
    with pytest.raises(FileNotFoundError, match="neither a workdir of ours"):
        Predictor.from_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="task must be one of"):
        Predictor.from_checkpoint(pretrain_workdir, task="ground")


def test_settings_defaults_are_the_official_ones():
    assert Settings.for_task("vqa") == Settings(5, 1, 10, True)
    assert Settings.for_task("caption") == Settings(5, 8, 25, True)
    assert Settings.for_task("caption", beam_size=3, max_length=None).beam_size == 3


def test_predict_cli(pretrain_workdir, photo, capsys):
    rc = cli.main(["predict", "--checkpoint", str(pretrain_workdir), "--task", "caption",
                   "--image", str(photo / "astronaut.jpg"), "--max-length", "3",
                   "--min-length", "1", "--beam-size", "2", "--json"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["image"].endswith("astronaut.jpg") and isinstance(row["caption"], str)
    assert cli.main(["predict", "--checkpoint", str(pretrain_workdir), "--image", "x.jpg"]) == 2
    assert "pretraining workdir" in capsys.readouterr().err


# ---- mPLUG-2 video (Predictor.from_checkpoint -> VideoPredictor) ---------------------------

def _video_workdir(path, config):
    """A workdir of an mPLUG-2 video task holding its freshly initialised state at step 1
    (what predict reads; no training: the tests check the plumbing, not the answers)."""
    import functools

    from etils import epath

    from mplug_jax import checkpoint, tasks, workdir
    from mplug_jax import sharding as shd
    from mplug_jax import train_state as ts
    config.mesh.sharding = "dp"
    task = tasks.build(config)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    tx, _, _, shardings = ts.state_spec(task, config.optim, 10, mesh, shd.rules("dp"))
    state = jax.jit(functools.partial(ts.init_state, task.init_params, task.init_extra, tx),
                    out_shardings=shardings)(jax.random.PRNGKey(0))
    path = epath.Path(path)
    path.mkdir(parents=True)
    workdir.write_config(path, config)
    ck = checkpoint.Checkpointer(path / workdir.CKPT, async_save=False)
    ck.save(1, state, None, force=True)
    ck.close()
    return path, task


@pytest.fixture(scope="module")
def video_setup(tmp_path_factory):
    """A video QA and a video caption workdir (tiny, 4 frames at 32 px) and two synthetic
    clips as frame folders (+ mp4 files when PyAV is installed)."""
    from configs.mplug2 import video_caption as mplug2_video_caption
    from configs.mplug2 import video_qa as mplug2_video_qa
    from mplug_jax.data.synthetic import video as synthetic_video
    d = tmp_path_factory.mktemp("video_predict")
    qa_cfg = mplug2_video_qa.get_config("tiny")
    cap_cfg = mplug2_video_caption.get_config("tiny")
    cap_cfg.task.generation.update(beam_size=2, min_length=1, max_length=5)
    qa_dir, qa_task = _video_workdir(d / "qa", qa_cfg)
    cap_dir, cap_task = _video_workdir(d / "cap", cap_cfg)
    paths = synthetic_video.write_video_files(str(d / "clips"), 2, num_frames=6, image_size=32)
    return dict(qa=qa_dir, cap=cap_dir, qa_task=qa_task, cap_task=cap_task, paths=paths, dir=d)


def test_video_predictor_answers_and_captions_as_the_tasks(video_setup):
    """Predictions on a frame folder equal the task's own generation on the release's test
    frames (segment middles, eval_clip), decoded as the release; an mp4 also works."""
    from mplug_jax.data.ops import video as video_lib
    from mplug_jax.predict import VideoPredictor
    from mplug_jax.mplug2.tasks.video_caption import decode_caption
    s = video_setup
    folder = os.path.join(s["paths"]["frames_root"], s["paths"]["video_ids"][0])
    clip = video_lib.eval_clip(video_lib.load_frames(folder, 4), 32)[None]

    qa = Predictor.from_checkpoint(s["qa"], beam_size=2, max_length=4)
    assert isinstance(qa, VideoPredictor) and qa.task == "video_qa" and qa.num_frames == 4
    q = "which way does the red circle move?"
    ans = qa.answer([folder], [q])
    ids, mask = qa.tokenizer.encode([q], max_length=qa.max_question_tokens)
    want = jax.jit(lambda p, v, i, m: s["qa_task"].generate(p, v, i, m, beam_size=2,
                                                            max_length=4)["ids"][:, 0])(
        qa.params, clip, ids, mask)
    assert ans == [qa.tokenizer.decode_official(np.asarray(want)[0])]

    cap = Predictor.from_checkpoint(s["cap"])
    assert cap.task == "video_caption" and cap.prompt == "a video of"
    assert cap.settings == Settings(2, 1, 5, True)  # the workdir's task.generation
    text = cap(folder)
    want = jax.jit(s["cap_task"].caption_beam)(cap.params, clip)["ids"]
    assert text == decode_caption(np.asarray(want)[0])
    if s["paths"]["mp4_root"]:
        mp4 = os.path.join(s["paths"]["mp4_root"], s["paths"]["video_ids"][1] + ".mp4")
        assert isinstance(cap(mp4), str)


def test_video_predict_cli_and_errors(video_setup, pretrain_workdir, capsys):
    s = video_setup
    folder = os.path.join(s["paths"]["frames_root"], s["paths"]["video_ids"][0])
    assert cli.main(["predict", "--checkpoint", str(s["cap"]), "--video", folder, "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["video"] == folder and isinstance(row["caption"], str)
    rc = cli.main(["predict", "--checkpoint", str(s["qa"]), "--video", folder, "--question",
                   "which way does the red circle move?", "--max-length", "4",
                   "--beam-size", "2", "--json"])
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert rc == 0 and len(rows) == 1 and isinstance(rows[0]["answer"], str)

    empty = s["dir"] / "empty_clip"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("no frames here")
    broken = s["dir"] / "broken.mp4"
    broken.write_bytes(b"\x00\x01 not a video" * 10)
    cap = Predictor.from_checkpoint(s["cap"])
    with pytest.raises(ValueError, match="cannot use video .*empty_clip: no decodable frame"):
        cap(empty)
    with pytest.raises(ValueError, match="broken.mp4"):
        cap(broken)
    with pytest.raises(FileNotFoundError, match="nope.mp4 does not exist"):
        cap(s["dir"] / "nope.mp4")
    with pytest.raises(ValueError, match="takes no question"):
        cap(folder, "what?")
    for argv, msg in (
            (["--checkpoint", str(pretrain_workdir), "--video", folder],
             "is an image checkpoint .*takes --image, not --video"),
            (["--checkpoint", str(s["cap"]), "--image", "x.jpg"], "pass --video"),
            (["--checkpoint", str(s["qa"]), "--video", folder], "pass --question"),
            (["--checkpoint", str(s["cap"]), "--video", str(empty)], "no decodable frame"),
            (["--checkpoint", str(s["cap"])], "pass --image .* or --video"),
            (["--checkpoint", str(s["qa"]), "--video", folder, "--task", "video_caption"],
             "not a 'video_caption' one")):
        assert cli.main(["predict"] + argv) == 2
        assert re.search(msg, capsys.readouterr().err), msg
