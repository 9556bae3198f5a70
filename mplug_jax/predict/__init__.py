"""Answer a question about a photo, caption it, or locate a referring expression in it, from a
checkpoint: the Python API behind `mplug-jax predict`.

    from mplug_jax.predict import Predictor
    vqa = Predictor.from_checkpoint("runs/vqa_base")                 # a VQA workdir of ours
    vqa.answer(["photo.jpg"], ["what is the man holding?"])          # -> ['a frisbee']
    cap = Predictor.from_checkpoint("converted/", task="caption")   # `mplug-jax convert` dir
    cap.caption(["photo.jpg"])
    grd = Predictor.from_checkpoint("runs/grounding")                # a grounding workdir
    grd.ground(["photo.jpg"], ["the man on the left"])               # -> [[x1, y1, x2, y2]]
    vid = Predictor.from_checkpoint("runs/m2vqa")                    # an mPLUG-2 video workdir
    vid.answer(["clip.mp4"], ["which way does it move?"])            # -> a VideoPredictor
    Predictor.from_checkpoint("runs/m2cap").caption(["frames_dir/"])  # video captioning

Generation is the official one (beam 5, docs/fixtures.md#generation-settings): VQA from the fused
[image; question] states (min 1, max 10 tokens), captions from the image states alone (min 8,
max 25; a workdir's own `task.generation` settings take precedence), texts post-processed as
the official evaluation. A pretraining workdir captions zero-shot: the prompt "a picture of"
goes through the text encoder and fusion as a prefix (the pretraining prefix-LM split, paper
section 5.3), the decoder continues it from [CLS].

Video (`VideoPredictor`, returned by `Predictor.from_checkpoint` for an mPLUG-2 workdir of task
`mplug2_video_qa` or `mplug2_video_caption`, or a `mplug-jax convert` mPLUG-2 directory with
task 'video_qa' / 'video_caption'): a video file (PyAV or OpenCV) or a folder of frame images,
`model.num_frames` frames at the segment middles and the release's test transform
(`data.video.eval_clip`: nearest resize, CLIP normalisation); answers by the official beam
search over [fused video; fused question] (5 / 1 / 10), captions over the video's image_embeds
from [CLS] (5 / 4 / 20), the prompt split off as the release does.
"""
from __future__ import annotations

from mplug_jax.predict.common import TASKS, VIDEO_TASKS, Settings
from mplug_jax.predict.image import ZERO_SHOT_PROMPT, Predictor
from mplug_jax.predict.video import VideoPredictor

__all__ = ["TASKS", "VIDEO_TASKS", "ZERO_SHOT_PROMPT", "Predictor", "Settings", "VideoPredictor"]
