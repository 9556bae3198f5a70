"""Command-line config handling: list overrides, the documented real-data commands, and config
or input errors as one `error:` line with exit status 2 (the traceback only with --debug).

Everything here fails before a model is built, so it runs in-process (`mplug_jax.main.cli`,
`mplug_jax.cli.main`) except the few checks of the installed entry points themselves."""
import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

from conftest import REPO
from mplug_jax import cli, config_args, errors
from mplug_jax import main as train_main

CONFIGS = sorted(p for p in glob.glob(str(REPO / "configs" / "**" / "*.py"), recursive=True)
                 if os.path.basename(p) not in ("__init__.py", "common.py", "models.py"))


def _spec(path: str) -> str:
    """A loadable spec of every config file: its tiny variant where it has one."""
    for arg in ("tiny", "msrvtt_qa,size=tiny", ""):
        try:
            config_args.load_config(f"{path}:{arg}" if arg else path)
            return f"{path}:{arg}" if arg else path
        except errors.ConfigError:
            continue
    raise AssertionError(f"no loadable variant of {path}")


def _fields(c, prefix=""):
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _fields(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_parse_sequence_forms():
    parse = config_args.parse_sequence
    assert parse("a.json,b.json") == ["a.json", "b.json"]
    assert parse(" a.json , b.json, ") == ["a.json", "b.json"]
    assert parse('["a.json", "b,c.json"]') == ["a.json", "b,c.json"]
    assert parse("['a.json']") == ["a.json"]
    assert parse("(0.3, 1)") == [0.3, 1]
    assert parse("0.3,1") == [0.3, 1]
    assert parse("/data/x.json") == ["/data/x.json"]
    assert parse("") == [] and parse("[]") == []
    for bad in ('["a.json"', "a,,b", '{"a": 1}'):
        with pytest.raises(ValueError):
            parse(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_list_and_tuple_field_is_overridable(path):
    """Both documented forms (comma-separated, JSON list) for every list field of every config;
    tuple fields take the comma form too (ml_collections alone reads `a,b` as one string)."""
    spec = _spec(path)
    config = config_args.load_config(spec)
    lists = [k for k, v in _fields(config) if isinstance(v, list)]
    tuples = [k for k, v in _fields(config) if isinstance(v, tuple) and v and
              all(isinstance(x, (int, float, str)) for x in v)]
    if not lists and not tuples:
        pytest.skip(f"{spec} has no list or tuple field")
    comma = [f"--config.{k}=x.json,y/z.json" for k in lists]
    as_json = [f'--config.{k}=["x.json", "y,z.json"]' for k in lists]
    got = config_args.load_config(spec, comma)
    got_json = config_args.load_config(spec, as_json)
    for k in lists:
        assert got[k] == ["x.json", "y/z.json"], k
        assert got_json[k] == ["x.json", "y,z.json"], k
    for k in tuples:
        old = config[k]
        text = ",".join(str(x) for x in reversed(old))
        assert config_args.load_config(spec, [f"--config.{k}={text}"])[k] == \
            tuple(reversed(old)), k
    # The run entry (locked config) reads them the same way.
    fv = config_args.parse_flags(["main", "--config", spec] + comma[:1], lock=True)
    if lists:
        assert fv.config[lists[0]] == ["x.json", "y/z.json"]


def _all_variants():
    """(config file, argument) of every variant and mode the config files define."""
    import importlib
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    out = []
    for path in CONFIGS:
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        module = importlib.import_module(name)
        variants = list(getattr(module, "_VARIANTS", {})) or [_spec(path).split(":", 1)[1]]
        for variant in variants:
            for extra in ("", ",mode=smoke", ",mode=zeroshot", ",mode=scst"):
                try:
                    module.get_config(variant + extra)
                except ValueError:
                    continue
                out.append((path, variant + extra))
    return out


def test_every_shipped_config_passes_the_value_checks():
    """No false alarm: the range rules accept every variant and mode as shipped."""
    from mplug_jax import config_checks
    specs = _all_variants()
    assert len(specs) > 30
    for path, arg in specs:
        config = config_args.load_config(f"{path}:{arg}")
        config_checks.check(config, training=False, files=False)


# ---- the documented real-data commands ------------------------------------------------------

_RUN = re.compile(r"(python -m mplug_jax\.main|mplug-jax (train|evaluate)) ")
_REAL_DATA = re.compile(r"--config\.[\w.]*(annotations|_files?|_root|roots|tfds_dir)=|"
                        r"dataset=json")
_PATH_FLAG = re.compile(r"--config\.[\w.]*(annotations|_files?|_root|roots|tfds_dir|"
                        r"init\.(checkpoint|config_bert|clip|bert))$|--checkpoint$")


def _documented_commands() -> list[str]:
    """Every command of README.md, docs/**/*.md and the config docstrings that points at real
    data, with continuation lines joined; placeholders ('...') and prose-interrupted lines left
    out."""
    texts = [(REPO / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((REPO / "docs").rglob("*.md"))]
    for path in CONFIGS:
        texts.append(ast.get_docstring(ast.parse(open(path).read())) or "")
    out = []
    for text in texts:
        joined = re.sub(r"\\\n\s*", " ", text)
        for line in joined.splitlines():
            m = _RUN.search(line)
            if not m:
                continue
            cmd = line[m.start():].split("  #")[0].strip().rstrip("`")
            if _REAL_DATA.search(cmd) and "..." not in cmd and "(" not in cmd.split("'")[0]:
                out.append(cmd)
    return out


COMMANDS = _documented_commands()


def _named_paths(argv: list[str]) -> list[str]:
    """The file / folder names a command passes (the error must name each)."""
    names = []
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(argv) and key == "--checkpoint":
            value = argv[i + 1]
        if not _PATH_FLAG.search(key) or not value:
            continue
        parsed = value
        if value[0] in "[{":
            parsed = json.loads(value)
        if isinstance(parsed, dict):
            names += [v for v in parsed.values() if v]
        elif isinstance(parsed, list):
            names += parsed
        else:
            names += config_args.parse_sequence(value) if "," in value else [value]
    return names


def test_the_documented_real_data_commands_are_found():
    # README: pretraining base and zero-shot retrieval / video QA; every real-data docstring.
    joined = "\n".join(COMMANDS)
    for what in ("configs/pretrain.py:base", "configs/vqa.py:base", "configs/caption.py:base",
                 "configs/retrieval.py:coco_large", "configs/nlvr2.py:base",
                 "configs/snli_ve.py:base", "configs/grounding.py:refcoco_large",
                 "configs/mplug2/pretrain.py:base", "configs/mplug2/retrieval.py:large",
                 "configs/mplug2/video_caption.py:large", "configs/mplug2/video_qa.py:large",
                 "configs/video_zeroshot.py:msrvtt_qa", "mode=zeroshot"):
        assert what in joined, what
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_real_data_command_stops_at_the_missing_files(command, tmp_path,
                                                                 monkeypatch, capsys):
    """Each command parses (its list / dict overrides included) and stops before building
    anything, on the files it names, all of them in one error line."""
    monkeypatch.chdir(tmp_path)  # none of the named files exists here
    argv = shlex.split(command.replace("configs/", f"{REPO}/configs/"))
    argv = [a.replace("=DIR", f"={tmp_path}/run") for a in argv]
    if argv[0] == "python":
        rc = train_main.cli(["mplug_jax.main"] + argv[3:])
    else:
        rc = cli.main(argv[1:])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: missing input files or folders"), lines[0]
    for name in _named_paths(argv):
        assert name in lines[0], (name, lines[0])


# ---- config and input errors: one line, exit status 2 ----------------------------------------

def _not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file" / "run")


def _read_only_parent(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: see the under-a-file case")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    return str(ro / "run")


TINY = "configs/pretrain.py:tiny,mode=smoke"
# (name, config, overrides, workdir maker or None, pattern the one error line must match)
ERROR_CASES = [
    ("unknown task", TINY, ["--config.task.name=pretrian"], None,
     r"unknown task 'pretrian' \(config.task.name\); valid: \[.*'pretrain'"),
    ("batch not divisible by the devices", TINY, ["--config.input.batch_size=12"], None,
     r"input.batch_size 12 must be divisible by the 8 batch shards"),
    ("misspelled field", TINY, ["--config.input.batchsize=16"], None,
     r"unknown config field --config.input.batchsize: Did you mean \"batch_size\""),
    ("missing dataset directory", TINY,
     ["--config.input.dataset=tfds", "--config.input.tfds_dir=no_such/tfds"], None,
     r"missing input files or folders .*input.tfds_dir: no_such/tfds"),
    ("workdir under a file", TINY, [], _not_a_folder,
     r"workdir .*file/run cannot be created: .*file is a file, not a folder"),
    ("read-only workdir parent", TINY, [], _read_only_parent,
     r"workdir .*ro/run cannot be created \(.*ro does not allow writing\)"),
    ("negative batch size", TINY, ["--config.input.batch_size=-8"], None,
     r"bad config: input.batch_size must be >= 1, got -8"),
    ("missing config file", "configs/pretrian.py:tiny", [], None,
     r"config file '.*configs/pretrian.py' not found"),
    ("bad config argument", "configs/pretrain.py:tiny,mode=smok", [], None,
     r"--config=.*: unknown mode 'smok'; valid: full, smoke"),
    ("value of the wrong type", TINY, ["--config.optim.lr=fast"], None,
     r"--config.optim.lr=fast: could not convert string to float"),
    ("min_length > max_length", "configs/caption.py:tiny",
     ["--config.task.generation.min_length=30"], None,
     r"task.generation.min_length 30 > task.generation.max_length 16"),
    ("negative learning rate", TINY, ["--config.optim.lr=-1e-4"], None,
     r"optim.lr must be >= 0, got -0.0001"),
]


def _train_argv(config, overrides, workdir):
    return ["mplug_jax.main", f"--config={REPO}/{config}", f"--workdir={workdir}", *overrides]


@pytest.mark.parametrize("name,config,overrides,make_workdir,pattern", ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_config_and_input_errors_are_one_line(name, config, overrides, make_workdir, pattern,
                                              tmp_path, capsys):
    workdir = make_workdir(tmp_path) if make_workdir else str(tmp_path / "run")
    argv = _train_argv(config, overrides, workdir)
    assert train_main.cli(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "run"), "nothing is written before the checks"
    # `--debug` (or MPLUG_JAX_DEBUG=1): the exception itself, i.e. its traceback.
    with pytest.raises(errors.ConfigError):
        train_main.cli(argv + ["--debug"])


def test_evaluate_and_plan_report_config_errors_the_same_way(tmp_path, capsys):
    config = f"--config={REPO}/{TINY}"
    assert cli.main(["evaluate", config, "--checkpoint", str(tmp_path / "none"), "--out",
                     str(tmp_path / "out")]) == 2
    assert re.fullmatch(r"error: missing input files .*init.checkpoint: .*none\n",
                        capsys.readouterr().err)
    assert cli.main(["plan", config, "--config.input.batch_size=0"]) == 2
    assert capsys.readouterr().err == "error: bad config: input.batch_size must be >= 1, got 0\n"
    with pytest.raises(errors.ConfigError, match="batch_size must be >= 1"):
        cli.main(["--debug", "plan", config, "--config.input.batch_size=0"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Errors that are not the user's (here a TypeError, and a ValueError from inside a
    library) propagate: the traceback is shown."""
    def broken(config, workdir):
        raise TypeError("a bug")
    from mplug_jax import trainer
    monkeypatch.setattr(trainer, "run", broken)
    with pytest.raises(TypeError, match="a bug"):
        train_main.cli(_train_argv(TINY, [], "/tmp/unused"))
    monkeypatch.setattr(trainer, "run", lambda c, w: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):
        train_main.cli(_train_argv(TINY, [], "/tmp/unused"))


@pytest.mark.parametrize("entry", [["-m", "mplug_jax.cli", "train"], ["-m", "mplug_jax.main"]])
def test_entry_points_print_one_line_or_the_traceback_with_debug(entry, tmp_path):
    """The installed entries in a fresh process (fails while parsing: no JAX start)."""
    argv = [sys.executable, *entry, f"--config={REPO}/{TINY}", f"--workdir={tmp_path}",
            "--config.input.batchsize=16"]
    env = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: unknown config field --config.input.batchsize: Did you mean "
                           "\"batch_size\" instead of \"batchsize\"?\n"), proc.stderr
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env=dict(env, **{errors.DEBUG_ENV: "1"}))
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError: unknown config field" in proc.stderr


def test_every_smoke_mode_splits_its_batch_over_the_test_devices():
    """`mode=smoke` runs train as shipped on the suite's 8 devices: the batch-split rule
    (batch divisible by the batch shards times `optim.accum_steps`) holds for every variant
    (mPLUG-2 captioning's base / large smoke once asked for 2 micro-batches of 8 over 8 devices)."""
    from mplug_jax import config_checks
    smoke = [(path, arg) for path, arg in _all_variants() if arg.endswith("mode=smoke")]
    assert len(smoke) > 10
    for path, arg in smoke:
        config = config_args.load_config(f"{path}:{arg}")
        config_checks.check(config, training=True, files=False)
