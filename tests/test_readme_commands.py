"""The shell commands of README.md and docs/**/*.md run as written.

Every fenced ```bash block is read (backslash continuations joined, heredoc bodies kept with
their command). Each command is either RUN (it takes under a minute: `--help`, `score` on
files the block writes, `schedule`, `shardings`, the parity check when the fixture is beside
the clone) or SKIPPED by design, with the reason listed below (training, real data, official
weights, minutes of compiling). A command in neither list fails the test, so a new command in
the docs must be classified here. A block whose commands are all RUN runs as one `bash -e`
script from the repository root with a 150 s limit. The launch-script examples are turned into
the `python -m mplug_jax.main` command each script runs, which must stop only at the missing
data files (so a `base` example is never refused for a missing flag). Every repository path the
pages name in backticks must exist.
"""
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from mplug_jax import main as train_main

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))
FIXTURE = REPO.parent / "shared" / "fixtures" / "vqa-tiny-s2"

RUN = [
    r"mplug-jax( \w+)? --help",
    r"python -m mplug_jax\.main --help",
    r"python benchmarks/\w+\.py --help",
    r"demo=\$\(mktemp -d\)",
    r"cat > \"\$demo/[\w.]+\" <<'EOF'",
    r"mplug-jax score --task \w+ --results \"\$demo/[\w.]+\" --annotations \"\$demo/[\w.]+\"",
    r"mplug-jax schedule --config configs/\S+ --steps-per-epoch \d+ --out \"\$demo/[\w.]+\"",
    r"mplug-jax shardings --config=configs/\S+( --config\.\S+)*",
    r"mplug-jax parity --fixture path/to/vqa-tiny-s2",  # run with the fixture beside the clone
]
SKIP = [
    (r"pip install", "installs packages"),
    (r"bash tests/run\.sh", "the whole suite: 20 to 40 minutes (docs/development.md)"),
    (r"python -m pytest -q tests/test_readme_commands\.py|python -m pytest -q -x "
     r"tests/test_readme_commands\.py", "this test itself"),
    (r"(mplug-jax train|python -m mplug_jax\.main) ",
     "a training run (minutes on a CPU to days); the real-data forms are driven to their "
     "missing-file error by tests/test_cli_errors.py"),
    (r"python benchmarks/main_job\.py --run", "the main job: about 7 minutes on 2 cores"),
    (r"mplug-jax evaluate ", "needs a trained workdir or official weights"),
    (r"mplug-jax (convert|export) ", "needs an official checkpoint or a trained workdir "
     "(tests/interop/ run the code on fixtures)"),
    (r"mplug-jax predict ", "needs a checkpoint (tests/test_predict.py)"),
    (r"mplug-jax prepare ", "needs official annotation files and images"),
    (r"mplug-jax plan ", "compiles the base / large step ahead of time: minutes"),
    (r"mplug-jax parity --fixture path/to/(?!vqa-tiny-s2)",
     "needs a fixture (tests/interop/, tests/mplug2/ check each)"),
    (r"mplug-jax score --task \w+ (--annotations|--results) runs/",
     "needs the result file of a trained run"),
    (r"python -c \"import json; from mplug_jax\.data\.",
     "writes the built-in held-out annotations into a trained run's workdir"),
    (r"python benchmarks/(?!main_job)\w+\.py", "a benchmark: minutes (smoke-tested by "
     "tests/test_benchmarks_smoke.py)"),
    (r"bash benchmarks/gpu_check\.sh", "needs a GPU"),
    (r"(VARIANT=\w+ WORKDIR=\S+ bash launch/|sbatch |TPU_NAME=\S+ ZONE=\S+ bash launch/)",
     "launches a cluster job; checked by test_launch_examples_stop_only_at_missing_data"),
]


def _blocks() -> list[tuple[str, int, str]]:
    """(page, index, text) of every ```bash block."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for i, m in enumerate(re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M)):
            out.append((str(page.relative_to(REPO)), i, m.group(1)))
    return out


def _commands(block: str) -> list[str]:
    """The commands of a block: continuations joined, comments, blank lines and heredoc
    bodies left out."""
    cmds, heredoc = [], None
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        line = line.split("  #")[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.search(r"<<'(\w+)'", line)
        if m:
            heredoc = m.group(1)
        cmds.append(line)
    return cmds


def _classify(cmd: str) -> str | None:
    """'run', the reason it is skipped, or None (unclassified)."""
    if any(re.fullmatch(p, cmd) for p in RUN):
        return "run"
    for pattern, reason in SKIP:
        if re.match(pattern, cmd):
            return reason
    return None


BLOCKS = _blocks()


def test_the_pages_have_commands_and_each_is_classified():
    assert len(BLOCKS) >= 15
    unclassified = [(page, cmd) for page, _, block in BLOCKS for cmd in _commands(block)
                    if _classify(cmd) is None]
    assert not unclassified, ("commands neither run nor skipped by design in "
                              f"tests/test_readme_commands.py: {unclassified}")
    runnable = [b for b in BLOCKS if all(_classify(c) == "run" for c in _commands(b[2]))]
    assert len(runnable) >= 5, runnable


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLUG_JAX_CACHE_DIR="off")
    env.pop("XLA_FLAGS", None)  # the commands run as a user runs them: one CPU device
    return env


def _runnable():
    out = []
    for page, i, block in BLOCKS:
        cmds = _commands(block)
        if cmds and all(_classify(c) == "run" for c in cmds):
            needs = "java" if "--task caption" in block else None
            out.append(pytest.param(block, needs, id=f"{page}#{i}"))
    return out


@pytest.mark.parametrize("block,needs", _runnable())
def test_block_runs_as_written(block, needs, tmp_path):
    if needs and shutil.which(needs) is None:
        pytest.skip(f"needs {needs} on PATH (docs: Install)")
    if shutil.which("mplug-jax") is None:
        pytest.skip("the mplug-jax entry point is not installed (pip install -e .)")
    if "parity --fixture path/to/vqa-tiny-s2" in block:
        if not (FIXTURE / "expected.npz").is_file():
            pytest.skip(f"fixture {FIXTURE} not beside the clone (docs/fixtures.md)")
        block = block.replace("path/to/vqa-tiny-s2", str(FIXTURE))
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + block)
    proc = subprocess.run(["bash", str(script)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, block + "\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    if "score --task vqa" in block:
        assert '"acc": 1.0' in proc.stdout, proc.stdout
    if "parity --fixture" in block:
        _check_documented_parity_output(proc.stdout)


def _check_documented_parity_output(out: str) -> None:
    """The rows of docs/checkpoints.md's example output (name, shape, ok) and its last line
    are what the command prints."""
    text = (REPO / "docs" / "checkpoints.md").read_text()
    shown = re.search(r"```text\n(output .*?)```", text, re.S).group(1).splitlines()
    printed = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    for line in shown[1:]:
        if line == "...":
            continue
        if line.startswith("parity "):
            assert line in out, (line, out[-500:])
            continue
        name = line.split()[0]
        assert name in printed, (name, out[-1000:])
        got = printed[name].split()
        want = line.split()
        assert got[-1] == want[-1] == "yes" and " ".join(got[1:-3]) == " ".join(want[1:-3]), \
            (line, printed[name])


def _launch_argv(cmd: str, tmp: pathlib.Path) -> list[str]:
    """The `python -m mplug_jax.main` argv a launch-script example runs."""
    words = shlex.split(cmd)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if words[0] == "sbatch":
        words = [w for w in words[1:] if not w.startswith("--nodes")]
    elif words[0] == "bash":
        words = words[1:]
    script = words.pop(0)
    if script.endswith("single_host.sh"):
        variant, rest = env.get("VARIANT", "tiny"), words
    else:
        variant, _, rest = words[0], words[1], words[2:]
    return ["mplug_jax.main", f"--config={REPO}/configs/pretrain.py:{variant}",
            f"--workdir={tmp}/run"] + rest


def test_launch_examples_stop_only_at_missing_data(tmp_path, monkeypatch, capsys):
    launches = [c for _, _, b in BLOCKS for c in _commands(b)
                if _classify(c) is not None and "launch/" in c]
    assert len(launches) >= 3, launches
    monkeypatch.chdir(tmp_path)  # none of the named files exists here
    for cmd in launches:
        assert train_main.cli(_launch_argv(cmd, tmp_path)) == 2, cmd
        err = capsys.readouterr().err
        assert err.startswith("error: missing input files or folders"), (cmd, err)


# Files the pages announce before they exist (remove an entry once the file is committed).
PENDING: dict[str, str] = {}  # results files a page names before the run that writes them
_PATH = re.compile(r"`((?:mplug_jax|configs|tests|benchmarks|launch|docs)/[\w./-]*\w)`")


def test_every_path_the_pages_name_exists():
    missing = []
    for page in PAGES:
        for m in _PATH.finditer(page.read_text()):
            path = m.group(1).split("#")[0]
            if "<" in path or "*" in path or path in PENDING:
                continue
            if not (REPO / path).exists() and not (REPO / "benchmarks" / "results" / path).exists():
                missing.append((str(page.relative_to(REPO)), path))
    assert not missing, missing


@pytest.mark.parametrize("flag", ["--help"])
def test_main_job_script_help(flag):
    proc = subprocess.run([sys.executable, "benchmarks/main_job.py", flag], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--run" in proc.stdout
