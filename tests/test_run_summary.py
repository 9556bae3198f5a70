"""`mplug-jax train` writes what it printed at the end to `<workdir>/results/summary.json`
(`mplug_jax/run_summary.py`), and `benchmarks/main_job.py` copies the main job's summary into
benchmarks/results/ only when it is the main job's. A 2-step run of the main job's config at
test size (the 32-wide model of `test_trainer.loop_config`, in-process)."""
import json
import pathlib
import sys

import pytest

from mplug_jax import main as train_main
from mplug_jax import metrics, run_summary

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import main_job  # noqa: E402

SMALL = ["model.hidden_size=32", "model.num_heads=2", "model.mlp_dim=64", "model.text_layers=1",
         "model.fusion_layers=2", "model.fusion_stride=1", "model.decoder_layers=1",
         "model.image_size=32", "model.patch_size=16", "model.vision_width=32",
         "model.vision_layers=1", "model.vision_heads=2", "model.embed_dim=16",
         "input.batch_size=8", "input.train_size=64", "input.max_tokens=16",
         "total_steps=2", "log_every_steps=1", "ckpt_every_steps=100",
         "mesh.shape.data=1", "mesh.shape.fsdp=1", "mesh.shape.tensor=1",
         "evals.heldout.num_examples=16", "evals.heldout.batch_size=8",
         "evals.heldout.num_captions=2", "evals.heldout.max_decode_len=6"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("summary") / "run"
    argv = ["mplug_jax.main", f"--config={main_job.MAIN_JOB}", f"--workdir={work}",
            "--config.task.itc.queue_size=0"] + [f"--config.{o}" for o in SMALL]
    assert train_main.cli(argv) == 0
    return work, argv


def test_summary_holds_the_printed_numbers_and_where_they_were_measured(finished, capsys):
    work, argv = finished
    s = json.loads((work / "results" / "summary.json").read_text())
    assert s["command"] == argv and s["config"] == main_job.MAIN_JOB
    assert s["task"] == "pretrain" and s["step"] == s["total_steps"] == 2
    assert s["overrides"] == argv[3:]
    # The eval's numbers are those the trainer logged, and the printed report is kept.
    logged = [r for r in metrics.read_jsonl(str(work / "metrics.jsonl")) if "heldout/itm_acc" in r]
    assert len(logged) == 1 and logged[0]["step"] == 2
    held = s["evals"]["heldout"]
    for k in ("i2t_r1", "t2i_r1", "itm_acc", "mlm_acc", "mlm_majority_baseline"):
        assert held[k] == pytest.approx(logged[0][f"heldout/{k}"]), k
    assert len(held["captions"]) == 2 and all(len(c) == 2 for c in held["captions"])
    assert s["printed"]["heldout"].startswith("zero-shot i2t R@1")
    assert s["train_last_row"]["step"] == 2 and "train/loss" in s["train_last_row"]
    # Where and how: machine, load averages, commit, time.
    assert s["machine"]["platform"] == "cpu" and s["machine"]["num_devices"] == 8
    assert len(s["load_avg_start"]) == 3 and len(s["load_avg_end"]) == 3
    assert s["commit"] is None or len(s["commit"]) == 40
    assert s["wall_s"] > 0 and s["cpu_s"] > 0
    assert run_summary.read(work) == s == run_summary.read(work / "results" / "summary.json")


def test_main_job_copies_only_the_main_jobs_summary(finished, tmp_path, capsys):
    work, _ = finished
    out = tmp_path / "main_job_test.json"
    # The test run has overrides: refused in one line unless allowed.
    assert main_job.main(["--workdir", str(work), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "overrides" in err and err.count("\n") == 1
    assert not out.exists()
    summary = run_summary.read(work)
    if summary["commit"] is None:  # not a git checkout: the copy is refused for that too
        assert main_job.check(summary, allow_overrides=True) == [
            "no commit recorded (run from a git checkout)"]
        return
    assert main_job.main(["--workdir", str(work), "--out", str(out), "--allow-overrides"]) == 0
    copied = json.loads(out.read_text())
    assert copied["benchmark"] == "main_job"
    assert {k: v for k, v in copied.items() if k not in ("benchmark", "source")} == summary
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("zero-shot i2t / t2i R@1") and summary["commit"][:7] in line
    # A missing summary and an unfinished run are one-line errors too.
    assert main_job.main(["--workdir", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    short = dict(summary, step=1, stopped="sigterm")
    assert any("stopped at step 1 of 2" in w for w in main_job.check(short, True))


def test_machine_tag_names_the_file():
    assert main_job.machine_tag({"platform": "cpu", "cpus": 2}) == "cpu2"
    assert main_job.machine_tag({"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"}) \
        == "nvidia_h100_80gb_hbm3"
