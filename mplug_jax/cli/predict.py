"""`mplug-jax predict`: answers, captions and boxes from a checkpoint (`mplug_jax.predict`)."""
from __future__ import annotations

import json


def _draw_boxes(image_path: str, boxes: list, out: str) -> None:
    """Save `image_path` with each [x1, y1, x2, y2] box outlined in red as PNG `out`."""
    from PIL import Image, ImageDraw
    with Image.open(image_path) as im:
        img = im.convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 200))
    for box in boxes:
        draw.rectangle([float(v) for v in box], outline=(255, 0, 0), width=width)
    img.save(out, format="PNG")


def _ground(args, pred=None) -> int:
    from mplug_jax.predict import Predictor
    if not args.text:
        raise ValueError("grounding needs --text (the referring expression; one, or one per "
                         "--image)")
    if len(args.text) not in (1, len(args.image)):
        raise ValueError(f"{len(args.image)} --image but {len(args.text)} --text")
    if args.out and len(args.image) != 1:
        raise ValueError("--out draws the box of one --image; pass a single image")
    if pred is None:
        pred = Predictor.from_checkpoint(args.checkpoint, task="grounding", step=args.step)
    texts = args.text * (len(args.image) if len(args.text) == 1 else 1)
    boxes = pred.ground(args.image, texts)
    for image, text, box in zip(args.image, texts, boxes):
        rounded = [round(v, 1) for v in box]
        if args.json:
            print(json.dumps({"image": image, "text": text, "box": rounded}))
        else:
            print(f"{image}\t{text}\t{rounded}" if len(boxes) > 1 else rounded)
    if args.out:
        _draw_boxes(args.image[0], boxes, args.out)
        print(f"wrote {args.out}")
    return 0


def _answer_or_caption(args, pred, inputs: list[str], key: str, qa_task: str,
                       about: str) -> int:
    """Answers (`pred.task == qa_task`: one --question for all inputs or one each) or captions
    for `inputs`, printed one per line (tab-separated with the input when several; JSON rows
    keyed `key` with --json). `about` names the inputs in the errors ('' or ' videos')."""
    if args.text or args.out:
        raise ValueError("--text / --out are for grounding checkpoints (--task ground)")
    if pred.task == qa_task:
        if not args.question:
            what = f"questions about{about}" if about else "questions"
            raise ValueError(f"{args.checkpoint} answers {what}: pass --question")
        if len(args.question) not in (1, len(inputs)):
            raise ValueError(f"{len(inputs)} --{key} but {len(args.question)} --question")
        questions = args.question * (len(inputs) if len(args.question) == 1 else 1)
        texts = pred.answer(inputs, questions)
    else:
        if args.question:
            raise ValueError(f"{args.checkpoint} captions{about} (task {pred.task!r}): drop "
                             "--question")
        texts = pred.caption(inputs)
    for i, text in enumerate(texts):
        if args.json:
            row = {key: inputs[i]}
            row.update({"question": questions[i], "answer": text} if pred.task == qa_task
                       else {"caption": text})
            print(json.dumps(row))
        else:
            print(text if len(texts) == 1 else f"{inputs[i]}\t{text}")
    return 0


def predict(args) -> int:
    """`mplug-jax predict`: answers, captions or boxes for --image / --video inputs."""
    from mplug_jax.predict import Predictor, VideoPredictor
    if args.min_length is not None and args.max_length is not None \
            and args.min_length > args.max_length:
        raise ValueError(f"--min-length {args.min_length} is above --max-length "
                         f"{args.max_length}: no output could satisfy both")
    if bool(args.image) == bool(args.video):
        raise ValueError("pass --image (photos) or --video (video files / frame folders), "
                         "not both or neither")
    if args.video and args.task in ("ground", "grounding", "vqa", "caption"):
        raise ValueError(f"--task {args.task} takes --image; videos use --task video_qa or "
                         "video_caption (or an mPLUG-2 workdir without --task)")
    if args.task in ("ground", "grounding"):
        return _ground(args)
    if args.video:
        pred = VideoPredictor.from_checkpoint(args.checkpoint, task=args.task, step=args.step,
                                              beam_size=args.beam_size,
                                              min_length=args.min_length,
                                              max_length=args.max_length)
        return _answer_or_caption(args, pred, args.video, "video", "video_qa", " videos")
    pred = Predictor.from_checkpoint(args.checkpoint, task=args.task, step=args.step,
                                     beam_size=args.beam_size, min_length=args.min_length,
                                     max_length=args.max_length)
    if isinstance(pred, VideoPredictor):
        raise ValueError(f"{args.checkpoint} is an mPLUG-2 video checkpoint (task "
                         f"{pred.task!r}): pass --video (a video file or frame folder), not "
                         "--image")
    if pred.task == "grounding":
        return _ground(args, pred)
    return _answer_or_caption(args, pred, args.image, "image", "vqa", "")
