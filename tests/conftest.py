"""Shared test setup: 8 fake CPU devices (set once, before JAX initialises) and fixtures."""
import os

# -O0 codegen without XLA:CPU's newer fusion emitters: a tiny pretraining step compiles in 11
# CPU s instead of 21 (34 at XLA's defaults) and runs as fast as at -O0 with them (same loss to
# the printed digits). At XLA's default -O level the old emitters compile 3.5x slower, so the
# learning runs' subprocesses, which drop XLA_FLAGS, keep XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in the user's home from tests (subprocesses inherit this);
# tests of the cache pass their own tmp directory.
os.environ["MPLUG_JAX_CACHE_DIR"] = "off"

import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

# Optional: one persistent JAX compilation cache for the whole test run, in a tmp directory made
# by the first process (pytest itself, before it starts the xdist workers) and inherited, as
# JAX's own environment variables, by the workers and by every subprocess a test starts (the
# CLI leaves JAX's settings alone while MPLUG_JAX_CACHE_DIR is off). Many tests compile the same
# tiny programs through different jit objects; from the second time on they are read back.
# Every program is written (no compile-time or size threshold); no size limit (JAX's LRU
# eviction takes a file lock and scans the directory on every write). The tests of the cache
# itself pass directories of their own. Opt-in: MPLUG_TEST_JAX_CACHE=new (a fresh tmp dir,
# removed at the end) or a directory; unset or "off": no shared cache. Off by default because a
# worker once died with a segmentation fault inside JAX's cache write (put_executable_and_time,
# XLA:CPU, jax 0.10.2) while two workers and subprocesses wrote the same directory.
TEST_CACHE_ENV = "MPLUG_TEST_JAX_CACHE"
_OWN_CACHE = None
os.environ.setdefault(TEST_CACHE_ENV, "off")
if os.environ[TEST_CACHE_ENV] == "new":
    _OWN_CACHE = os.environ[TEST_CACHE_ENV] = tempfile.mkdtemp(prefix="mplug_jax_test_cache_")
if os.environ[TEST_CACHE_ENV] != "off":
    os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ[TEST_CACHE_ENV],
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                      JAX_COMPILATION_CACHE_MAX_SIZE="-1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ[TEST_CACHE_ENV] == "off":
    # Not even a JAX_COMPILATION_CACHE_DIR from the caller's environment (subprocesses drop it
    # too): a test run compiles fresh unless it opted in above.
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    jax.config.update("jax_enable_compilation_cache", False)
else:  # in case something imported jax before this file
    jax.config.update("jax_compilation_cache_dir", os.environ[TEST_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", -1)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


# Files that take minutes (training runs in subprocesses, several processes), as paths under
# tests/: they are handed to the xdist workers first (run.sh passes --no-loadscope-reorder), so
# the suite never ends with one worker alone on a long file. Longest first; every other file
# keeps pytest's order.
SLOW_FILES = ("learning/test_learn_caption.py", "learning/test_learn_pretrain.py",
              "learning/test_learn_vqa.py", "learning/test_learn_mplug2_video_qa.py",
              "learning/test_learn_grounding.py", "learning/test_learn_retrieval.py",
              "learning/test_learn_nlvr2.py", "learning/test_learn_snli_ve.py",
              "learning/test_learn_mplug2_retrieval.py", "learning/test_learn_mplug2_pretrain.py",
              "test_tasks_smoke.py", "test_trainer.py", "test_train_step.py",
              "test_reliability.py", "test_multihost.py", "test_sharding_strategies.py",
              "test_caption.py", "mplug2/test_mplug2_video_qa.py",
              "mplug2/test_mplug2_retrieval.py", "mplug2/test_mplug2_pretrain.py", "test_vqa.py",
              "test_retrieval.py", "test_grounding_stages.py", "test_grounding.py",
              "test_predict.py",
              "mplug2/test_mplug2_video_caption.py", "test_nlvr2.py", "test_snli_ve.py",
              "test_compilation_cache.py", "test_gpu_check.py")
TESTS = pathlib.Path(__file__).resolve().parent


# Test tiers: `learning` (fine-tuning runs that must beat a named baseline: every test under
# tests/learning/, marked here by folder) and `integration` (several processes, signals).
# `bash tests/run.sh --quick` leaves both out.
TIERS = {"learning": "a run that must learn beyond a named baseline (minutes)",
         "integration": "several processes or signals (minutes)"}


def pytest_configure(config):
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def _in_tests(item) -> str:
    try:
        return item.path.resolve().relative_to(TESTS).as_posix()
    except ValueError:
        return item.path.name


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _in_tests(item).startswith("learning/"):
            item.add_marker(pytest.mark.learning)
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(_in_tests(item), len(rank)))  # stable: file order kept


# MPLUG_TEST_CPU=DIR: every test process (each xdist worker) writes DIR/cpu-<worker>.json with
# each test's CPU seconds (this process plus the subprocesses it waited for, user + system;
# setup, call and teardown, so a shared fixture counts in the first test that asks for it) and
# the whole session's; `python tests/cpu_report.py DIR` sums them per file and per tier.
_CPU = {"tests": {}, "start": None}


def _cpu_seconds():
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    out = os.environ.get("MPLUG_TEST_CPU")
    if not out:
        yield
        return
    cpu, wall = _cpu_seconds(), time.monotonic()
    yield
    tiers = sorted(name for name in TIERS if item.get_closest_marker(name))
    _CPU["tests"][item.nodeid] = {"cpu_s": round(_cpu_seconds() - cpu, 3),
                                  "wall_s": round(time.monotonic() - wall, 3), "tiers": tiers}
    _write_cpu(out)  # after every test: a worker that dies keeps what it measured


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_sessionfinish(session):
    out = os.environ.get("MPLUG_TEST_CPU")
    if out and _CPU["tests"]:
        _write_cpu(out)


def _write_cpu(out: str) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = pathlib.Path(out) / f"cpu-{worker}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # The session's CPU from process start (imports, collection) to now.
    path.write_text(json.dumps({"session_cpu_s": round(_cpu_seconds(), 3),
                                "tests": _CPU["tests"]}, indent=1))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
    """After each test file: drop JAX's compiled-program caches and the file's own
    `functools.cache`d helpers (compiled steps, built tasks). A worker runs dozens of files;
    without this one held 7.5 GB resident late in a full run, and the two workers that died
    (segfault / abort inside an XLA compile, in two full runs) died late in long runs. The
    cause is not established; keeping workers small is the cheap part."""
    yield
    for value in list(vars(request.module).values()):
        if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
            value.cache_clear()
    jax.clear_caches()
    gc.collect()


def fixture_dirs():
    """Every official parity fixture folder under ../shared/fixtures (empty if absent)."""
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if (p / "expected.npz").is_file())


@pytest.fixture
def rng():
    return jax.random.PRNGKey(0)


@pytest.fixture(scope="session")
def mesh8():
    assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices"
    from mplug_jax.sharding import make_mesh
    return make_mesh({"data": 8, "fsdp": 1, "tensor": 1})


@pytest.fixture(scope="session")
def pretrain_workdir(tmp_path_factory):
    """One short pretraining run shared by the tests that start from a workdir of ours (export,
    fine-tuning init): `test_trainer.loop_config`, 2 steps, checkpoints at steps 1 and 2."""
    from mplug_jax import trainer
    from test_trainer import loop_config
    cfg = loop_config()
    cfg.total_steps, cfg.ckpt_every_steps = 2, 1
    path = tmp_path_factory.mktemp("pretrain") / "run"
    trainer.run(cfg, str(path))
    return path
