"""`Predictor` / `mplug-jax predict`: checkpoints of each task, real photos, bad inputs."""
import json

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
