"""Video QA / captioning as TFDS array_record datasets: frame folders and (PyAV) video files."""
import argparse
import importlib.abc
import importlib.machinery
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from no_tensorflow import run_prepare_without_tensorflow
from mplug_jax.data import prepare
from mplug_jax.data.formats import builder as tfds_builder
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import DataError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
           (255, 0, 255), (128, 128, 128), (255, 255, 255), (0, 0, 0), (255, 128, 0)]


class _NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `tensorflow` but fails to import it (probing keeps working, using it breaks)."""

    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError("tensorflow is blocked in this test")

    def exec_module(self, module):
        raise ImportError("tensorflow is blocked in this test")


@pytest.fixture(autouse=True)
def no_tensorflow(monkeypatch):
    had_tf = "tensorflow" in sys.modules
    monkeypatch.setattr(sys, "meta_path", [_NoTensorFlow(), *sys.meta_path])
    yield
    assert had_tf or "tensorflow" not in sys.modules


def _frame_folder(folder: pathlib.Path, n: int, ext: str = ".png") -> list[pathlib.Path]:
    """`n` distinct small frames: windows sliding over a photo, resized to 24x16."""
    folder.mkdir(parents=True)
    photo = skdata.astronaut()
    paths = []
    for i in range(n):
        path = folder / f"{i:04d}{ext}"
        Image.fromarray(photo[:, 20 * i:20 * i + 300]).resize((24, 16)).save(path)
        paths.append(path)
    return paths


def _jsonl(path: pathlib.Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _qa_jsonl(path: pathlib.Path, rows) -> str:
    """`_jsonl` of video QA records, one `(video_id, question, answer)` per row."""
    return _jsonl(path, [dict(video_id=v, question=q, answer=a) for v, q, a in rows])


def _filler_qa(*video_ids) -> list[tuple]:
    """QA rows with a placeholder question and answer (for clips that are skipped)."""
    return [(v, "q", "a") for v in video_ids]


def _by_id(source) -> dict[int, dict]:
    return {int(source[i]["id"]): source[i] for i in range(len(source))}


def _videos(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    frames = {"clip_png": _frame_folder(root / "clip_png", 10),
              "clip_jpg": _frame_folder(root / "clip_jpg", 3, ".jpg")}
    (root / "empty_clip").mkdir()
    broken = _frame_folder(root / "broken_clip", 4)
    broken[2].write_bytes(b"")
    return frames


def test_video_qa_frame_folders_skips_and_counts(tmp_path):
    videos = _videos(tmp_path / "videos")
    ann = _qa_jsonl(tmp_path / "qa.jsonl", [
        ("clip_png", "what is shown?", "astronaut"),
        ("clip_png", "who?", "a woman"),
        ("clip_jpg", "short?", "yes")] + _filler_qa("empty_clip", "broken_clip", "missing_clip"))
    with pytest.raises(DataError, match="bad_image=1"):  # 3 of 6 skipped > 5 %
        prepare.prepare("video_qa", ann, str(tmp_path / "videos"), str(tmp_path / "strict"),
                        num_frames=4)
    report = prepare.prepare("video_qa", ann, str(tmp_path / "videos"), str(tmp_path / "out"),
                             num_frames=4, max_skip_rate=0.6)
    assert report["splits"]["train"] == {
        "written": 3, "skipped": {"bad_image": 1, "empty_file": 1, "missing_file": 1}}
    assert ("3 records written, 3 skipped (missing_file=1, empty_file=1, bad_image=1)"
            in prepare.format_report(report))

    src = tfds_builder.load_prepared(str(tmp_path / "out"), "video_qa")["train"]
    recs = _by_id(src)
    assert sorted(recs) == [0, 1, 2]
    first = recs[0]
    picks = video.frame_indices(10, 4)
    assert picks == [0, 3, 5, 8] and first["frame_indices"].tolist() == picks
    assert len(first["frames"]) == 4
    for frame, i in zip(first["frames"], picks):  # PNG frames stored byte for byte, in order
        np.testing.assert_array_equal(frame, np.asarray(Image.open(videos["clip_png"][i])))
    assert (first["video_id"], first["question"], first["answer"], first["question_id"]) == (
        b"clip_png", b"what is shown?", b"astronaut", 0)
    assert recs[1]["question"] == b"who?" and recs[1]["question_id"] == 1
    np.testing.assert_array_equal(np.stack(recs[1]["frames"]), np.stack(first["frames"]))
    short = recs[2]  # 3 frames for 4 slots: frames repeat, original JPEG bytes kept
    assert short["frame_indices"].tolist() == video.frame_indices(3, 4)
    for frame, i in zip(short["frames"], short["frame_indices"]):
        np.testing.assert_array_equal(frame, np.asarray(Image.open(videos["clip_jpg"][i])))

    with pytest.raises(DataError, match="holds 4 frames per video, not 8"):
        prepare.prepare("video_qa", ann, str(tmp_path / "videos"), str(tmp_path / "out"),
                        num_frames=8, max_skip_rate=0.6)
    again = prepare.prepare("video_qa", ann, str(tmp_path / "videos"), str(tmp_path / "out"),
                            num_frames=4, max_skip_rate=0.6)
    assert again.get("already_prepared")


def test_video_caption_train_and_eval_splits(tmp_path):
    videos = _videos(tmp_path / "videos")
    train = _jsonl(tmp_path / "train.jsonl", [
        {"video_id": "clip_png", "caption": "an astronaut smiles"},
        {"video_id": "clip_png", "caption": "a woman in a space suit"},
        {"video_id": "clip_jpg", "caption": "a short clip"}])
    test = _jsonl(tmp_path / "test.jsonl", [
        {"video_id": "clip_jpg", "golden_captions": ["one", "two"]},
        {"video_id": "clip_png", "golden_captions": ["three"]}])
    report = prepare.prepare("video_caption", {"train": train, "test": test},
                             str(tmp_path / "videos"), str(tmp_path / "out"))
    assert {k: v["written"] for k, v in report["splits"].items()} == {"train": 3, "test": 2}
    ds = tfds_builder.load_prepared(str(tmp_path / "out"), "video_caption")
    tr, te = _by_id(ds["train"]), _by_id(ds["test"])
    assert [c.decode() for r in tr.values() for c in r["captions"]] == [
        "an astronaut smiles", "a woman in a space suit", "a short clip"]
    gold = te[0]
    assert gold["video_id"] == b"clip_jpg" and [c.decode() for c in gold["captions"]] == [
        "one", "two"]
    assert len(gold["frames"]) == 16  # default num_frames; 3 source frames repeat
    assert gold["frame_indices"].tolist() == video.frame_indices(3, 16)
    png = te[1]
    assert png["frame_indices"].tolist() == video.frame_indices(10, 16)
    for frame, i in zip(png["frames"], png["frame_indices"]):
        np.testing.assert_array_equal(frame, np.asarray(Image.open(videos["clip_png"][i])))


def _write_video(path: pathlib.Path, codec: str, pix_fmt: str) -> None:
    """A 10-frame 32x32 clip whose frame i is the solid colour COLOURS[i], written by PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, pix_fmt
        for colour in COLOURS:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), colour, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _assert_colours(frames, picks) -> None:
    for frame, i in zip(frames, picks):
        np.testing.assert_allclose(np.asarray(frame).reshape(-1, 3).mean(0), COLOURS[i],
                                   atol=6)


def test_video_files_through_pyav(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "videos"
    root.mkdir()
    _write_video(root / "clip.mp4", "mpeg4", "yuv420p")
    _write_video(root / "msvd_clip.avi", "mjpeg", "yuvj420p")
    _write_video(root / "tumblr_abc.gif", "gif", "rgb8")
    (root / "garbage.mp4").write_bytes(b"\x00" * 256)
    good = (root / "clip.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[:len(good) // 2])
    (root / "empty.mp4").write_bytes(b"")
    picks = video.frame_indices(10, 5)
    for name in ("clip.mp4", "msvd_clip.avi", "tumblr_abc.gif"):
        frames = video.load_frames(str(root / name), 5)
        assert len(frames) == 5 and frames[0].size == (32, 32) and frames[0].mode == "RGB"
        _assert_colours(frames, picks)
    # Matroska states no frame count: frames are counted by decoding (9 survive the cut).
    _write_video(tmp_path / "clip.mkv", "mpeg4", "yuv420p")
    mkv = (tmp_path / "clip.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(mkv[:len(mkv) * 4 // 5])
    cut_picks, cut = video.sample_frames(str(tmp_path / "cut.mkv"), 5)
    assert cut_picks == video.frame_indices(9, 5)
    _assert_colours(cut, cut_picks)

    ann = _qa_jsonl(tmp_path / "qa.jsonl", [
        ("clip", "colours?", "many"),
        ("msvd_clip", "avi?", "yes"),
        ("tumblr_abc", "gif?", "yes")] + _filler_qa("garbage", "truncated", "empty"))
    report = prepare.prepare("video_qa", ann, str(root), str(tmp_path / "out"), num_frames=5,
                             max_skip_rate=0.5)
    assert report["splits"]["train"] == {"written": 3,
                                         "skipped": {"bad_image": 2, "empty_file": 1}}
    recs = _by_id(tfds_builder.load_prepared(str(tmp_path / "out"), "video_qa")["train"])
    assert [recs[i]["video_id"] for i in range(3)] == [b"clip", b"msvd_clip", b"tumblr_abc"]
    for rec in recs.values():
        assert rec["frame_indices"].tolist() == picks and len(rec["frames"]) == 5
        _assert_colours(rec["frames"], picks)


def test_video_header_over_counting_frames_is_resampled(monkeypatch):
    """A container claiming more frames than it decodes is sampled over the real count."""
    shades = [Image.new("RGB", (8, 8), (20 * i,) * 3) for i in range(6)]

    def fake_opener(path):
        return 12, lambda: (lambda img=img: img for img in shades)

    monkeypatch.setattr(video, "_video_decoder", lambda path: (fake_opener, (OSError,)))
    picks, frames = video.sample_frames(__file__, 3)  # any existing non-empty file
    assert picks == video.frame_indices(6, 3) == [0, 2, 4]
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 40, 80]


def test_cli_prepare_video_without_tensorflow(tmp_path):
    """`mplug-jax prepare` for both video formats in a fresh interpreter without TensorFlow."""
    _videos(tmp_path / "videos")
    qa = _qa_jsonl(tmp_path / "qa.jsonl", [("clip_png", "q?", "a"), ("missing_clip", "q?", "b")])
    cap = _jsonl(tmp_path / "cap.jsonl", [{"video_id": "clip_jpg", "golden_captions": ["c"]}])
    stdout = run_prepare_without_tensorflow(f"""
        common = ["--video-root", {str(tmp_path / "videos")!r}, "--out", {str(tmp_path / "o")!r},
                  "--num-frames", "3", "--max-skip-rate", "0.5"]
        assert prepare.run_prepare(p.parse_args(
            ["--format", "video_qa", "--annotations", {qa!r}] + common)) == 0
        assert prepare.run_prepare(p.parse_args(
            ["--format", "video_caption", "--annotations", {cap!r}, "--split", "test",
             "--eval"] + common)) == 0
        qa = tfds_builder.load_prepared({str(tmp_path / "o")!r}, "video_qa")["train"]
        cap = tfds_builder.load_prepared({str(tmp_path / "o")!r}, "video_caption")["test"]
        assert len(qa) == 1 and len(qa[0]["frames"]) == 3
        assert qa[0]["frames"][0].shape == (16, 24, 3)
        assert list(cap[0]["captions"]) == [b"c"] and cap[0]["frame_indices"].tolist() == [0, 1, 2]
    """)
    assert "1 records written, 1 skipped (missing_file=1)" in stdout
    assert "test: 1 records written, 0 skipped (none)" in stdout


def test_video_file_without_decoder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Without PyAV and OpenCV a video file stops `prepare` with an install hint (no crash)."""
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    monkeypatch.setitem(sys.modules, "cv2", None)
    root = tmp_path / "videos"
    _frame_folder(root / "folder_clip", 4)
    (root / "clip.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="PyAV"):
        video.load_frames(str(root / "clip.mp4"), 4)
    assert len(video.load_frames(str(root / "folder_clip"), 2)) == 2
    ann = _qa_jsonl(tmp_path / "qa.jsonl", [("clip", "q", "a")])
    parser = argparse.ArgumentParser()
    prepare.add_prepare_args(parser)
    args = parser.parse_args(["--format", "video_qa", "--annotations", ann, "--video-root",
                              str(root), "--out", str(tmp_path / "out")])
    assert prepare.run_prepare(args) == 1
    assert "prepare failed: cannot decode" in capsys.readouterr().out
