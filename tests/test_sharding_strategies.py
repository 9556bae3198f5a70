"""Sharding strategies (`mesh.sharding` dp / fsdp / fsdp_tp) on 8 fake devices.

- Every preset gives the losses and the updated state of 1 device (same train step).
- Every state leaf is placed as the logical-axis rules say (checked independently of
  `train_state.abstract_state`), and the readable table of `mplug-jax shardings` matches the
  golden file per preset under tests/golden/ (regenerate: MPLUG_UPDATE_GOLDEN=1 pytest ...).
- `mplug-jax shardings` / `plan` work from the command line (fresh process, fake devices).
"""
import difflib
import functools
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from mplug_jax import losses, plan, tasks, trainer
from mplug_jax import sharding as shd
from mplug_jax.data.pipeline import make_global_batch

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
B, L = 16, 8
# A mesh per preset on 8 devices; fsdp uses both batch axes so `data` x `fsdp` batches are hit.
MESHES = {"dp": {"data": 8, "fsdp": 1, "tensor": 1},
          "fsdp": {"data": 2, "fsdp": 4, "tensor": 1},
          "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2}}
# XLA:CPU codegen at -O0: halves compile time on the 2-core CI; numerics stay float32.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def small_config(preset: str = "dp", shape: dict | None = None):
    """`tiny,mode=smoke` with one 32-wide layer per stack and a 2-batch ITC queue.

    The real vocabulary stays, so `test_multihost.py` feeds it tokenized synthetic records and
    shares the compiled 1-device step (`one_device_step`); `test_train_step.py` starts from it.
    """
    c = pretrain_config.get_config("tiny,mode=smoke")
    c.model.update(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1,
                   fusion_layers=1, fusion_stride=1, decoder_layers=1, image_size=32,
                   patch_size=16, vision_width=32, vision_layers=1, vision_heads=2,
                   embed_dim=16, max_len=L)
    c.input.batch_size, c.input.max_tokens = B, L
    c.task.itc.queue_size = 2 * B
    c.task.itc.alpha_warmup_epochs = 0.0  # distillation active from step 0
    # Adam with a large eps: float noise between layouts cannot flip a near-zero gradient's
    # sign into a full-lr difference.
    c.optim.update(eps=1e-3, warmup_steps=0, lr=1e-3)
    c.mesh.sharding = preset
    c.mesh.shape = dict(shape or MESHES[preset])
    return c


def make_batch(seed: int, b: int = B, max_id: int = 1000) -> dict:
    """Random images and texts of random lengths (ids below `max_id`); shared with
    `test_train_step.py`."""
    r = np.random.default_rng(seed)
    lengths = r.integers(3, L + 1, size=b)
    ids = r.integers(losses.MASK_ID + 1, max_id, size=(b, L)).astype(np.int32)
    ids[:, 0] = losses.CLS_ID
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    return {"image": r.normal(size=(b, 32, 32, 3)).astype(np.float32),
            "text_ids": np.where(mask > 0, ids, 0).astype(np.int32), "text_mask": mask,
            "idx": np.arange(b, dtype=np.int32)}


def compile_step(s: trainer.Setup, config):
    """`trainer.compile_step` at -O0 codegen."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), make_batch(0))
    return trainer.compile_step(s, config, abstract, FAST_COMPILE)


def run_steps(config, mesh, batches):
    """(setup, final state, [metrics per step]) of `batches` from a fresh state on `mesh`."""
    s = trainer.setup(config, steps_per_epoch=10, mesh=mesh)
    step = compile_step(s, config)
    state = trainer.init_state(s, config.seed)
    outs = []
    for b in batches:
        state, m = step(state, make_global_batch(b, mesh))
        outs.append(jax.device_get(m))
    return s, state, outs


@functools.cache
def one_device_step():
    """(setup, compiled step, mesh) of `small_config()` on one device (compiled once)."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    s = trainer.setup(small_config(), steps_per_epoch=10, mesh=mesh)
    return s, compile_step(s, small_config()), mesh


@functools.cache
def one_device_run():
    """Two steps on one device: the reference of every preset."""
    s, step, mesh = one_device_step()
    state = trainer.init_state(s, 0)
    outs = []
    for b in (make_batch(0), make_batch(1)):
        state, m = step(state, make_global_batch(b, mesh))
        outs.append(jax.device_get(m))
    return jax.device_get(state), outs


def expected_specs(s: trainer.Setup, rule_set: tuple) -> dict[str, tuple]:
    """Leaf path -> partition spec, derived here from the rules and the params' logical axes.

    params: each logical axis through the rules; optimizer moments and momentum params: their
    param's spec; ITC queues: ('queue', None) through the rules; everything else replicated.
    """
    rules = dict(rule_set)
    boxed = jax.eval_shape(s.task.init_params, jax.random.PRNGKey(0))
    names = {}

    def note(path, box):
        names[plan._path(path)] = tuple(box.names)

    jax.tree.map_with_path(note, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    param_spec = {p: tuple(rules.get(n) for n in ns) for p, ns in names.items()}
    for p, spec in param_spec.items():
        used = [a for a in spec if a is not None]
        assert len(used) == len(set(used)), f"{p}: mesh axis used twice by the rules: {spec}"
    out = {}
    for row in plan.leaf_rows(s.abstract, s.shardings, s.mesh):
        path = row["path"]
        ndim = len(row["shape"])
        spec = (None,) * ndim
        if path.startswith("params/"):
            spec = param_spec[path[len("params/"):]]
        elif path.startswith("extra/params_m/"):
            spec = param_spec[path[len("extra/params_m/"):]]
        elif path.startswith("opt_state/"):
            match = [p for p in param_spec if path.endswith("/" + p)]
            if match:  # Adam moments mirror their parameter
                spec = param_spec[max(match, key=len)]
        elif path.startswith("extra/") and path.endswith("_queue"):
            spec = (rules.get("queue"), None)
        out[path] = spec
    return out


def _same_spec(a: tuple, b: tuple) -> bool:
    """Partition specs equal up to trailing Nones."""
    def norm(s):
        s = list(s)
        while s and s[-1] is None:
            s.pop()
        return tuple(s)
    return norm(a) == norm(b)


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_preset_matches_one_device_and_rules(preset):
    ref_state, ref_outs = one_device_run()
    config = small_config(preset)
    mesh = shd.make_mesh(config.mesh.shape)
    s, state, outs = run_steps(config, mesh, [make_batch(0), make_batch(1)])
    # 1. Same losses and gradient norms at each step (float32 reductions in another order).
    for i, (ref, got) in enumerate(zip(ref_outs, outs)):
        for k in ("train/loss", "train/loss_itc", "train/loss_itm", "train/loss_mlm",
                  "train/loss_prefix_lm", "train/l2_grads", "train/l2_updates"):
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, err_msg=f"step {i + 1} {k}")
    # 2. Same updated state: params, optimizer moments, momentum params, queues, counters.
    got = jax.device_get(state)
    ref_leaves = jax.tree_util.tree_flatten_with_path(ref_state)[0]
    got_leaves = jax.tree.leaves(got)
    assert len(ref_leaves) == len(got_leaves)
    for (path, x), y in zip(ref_leaves, got_leaves):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    assert int(got.step) == 2 and int(got.extra["queue_ptr"]) == 0  # 2 x B wraps the 2B queue
    # 3. Every live leaf is placed as declared, and the declaration is what the rules say.
    expected = expected_specs(s, shd.rules(preset))
    live = {}
    jax.tree.map_with_path(lambda p, x: live.__setitem__(plan._path(p), x), state)
    assert set(live) == set(expected)
    wrong = [(p, tuple(live[p].sharding.spec), spec) for p, spec in expected.items()
             if not _same_spec(tuple(live[p].sharding.spec), spec)]
    assert not wrong, f"{len(wrong)} leaves not placed by the rules, e.g. {wrong[:5]}"
    sharded = {a for spec in expected.values() for a in spec if a is not None}
    assert sharded == {"dp": set(), "fsdp": {"fsdp"}, "fsdp_tp": {"fsdp", "tensor"}}[preset]


def golden_args(preset: str) -> list[str]:
    """The `mplug-jax shardings` arguments whose output is tests/golden/shardings_<preset>.txt."""
    shape = MESHES[preset]
    return ["--config=configs/pretrain.py:tiny,mode=smoke", "--devices=8",
            "--config.task.itc.queue_size=64", f"--config.mesh.sharding={preset}",
            *(f"--config.mesh.shape.{k}={v}" for k, v in shape.items())]


def _diff(want: str, got: str, name: str) -> str:
    return "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                        f"golden/{name}", "regenerated", n=1))


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_sharding_table_matches_golden(preset):
    """The table of the real `tiny` model (with queues); MPLUG_UPDATE_GOLDEN=1 rewrites it."""
    args = golden_args(preset)
    config = plan.load_config(args[0].split("=", 1)[1], [a for a in args if
                                                        a.startswith("--config.")])
    text = "# mplug-jax shardings " + " ".join(args) + "\n" + plan.state_table(config)
    path = GOLDEN / f"shardings_{preset}.txt"
    if os.environ.get("MPLUG_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with MPLUG_UPDATE_GOLDEN=1 to create it"
    want = path.read_text()
    assert text == want, ("sharding table changed (MPLUG_UPDATE_GOLDEN=1 to accept):\n"
                          + _diff(want, text, path.name))


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLUG_FAKE_DEVICES")}
    return subprocess.run([sys.executable, "-m", "mplug_jax.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_shardings_cli_prints_the_golden_table():
    """A fresh process: `--devices 8` makes the fake devices before JAX starts."""
    out = _cli("shardings", *golden_args("fsdp_tp"))
    assert out.returncode == 0, out.stderr[-3000:]
    want = (GOLDEN / "shardings_fsdp_tp.txt").read_text()
    assert out.stdout == want, _diff(want, out.stdout, "shardings_fsdp_tp.txt")


def test_plan_cli_reports_memory_flops_and_fit():
    """ITC-only tiny model on 2 fake devices (a small program: quick to compile)."""
    args = ["plan", "--config=configs/pretrain.py:tiny,mode=smoke", "--devices=2",
            "--config.mesh.sharding=fsdp", "--config.mesh.shape.data=1",
            "--config.mesh.shape.fsdp=2", "--config.model.dtype=bfloat16",
            "--config.model.remat_policy=full", "--config.task.loss_weights.itm=0",
            "--config.task.loss_weights.mlm=0", "--config.task.loss_weights.prefix_lm=0"]
    out = _cli(*args, "--device-memory-gb=0.01")
    assert out.returncode == 3, out.stderr[-3000:]  # exit code 3: does not fit
    text = out.stdout
    assert "mesh data=1, fsdp=2, tensor=1 (2 devices), rules fsdp" in text, text
    assert "dtype bfloat16/float32, remat full" in text, text
    assert "does NOT fit in 0.01 GB per device" in text, text
    rows = {line[:23].strip(): line[23:] for line in text.splitlines() if line.startswith("  ")}
    for key in ("params", "optimizer state", "momentum params", "activations / temps",
                "total (peak)"):
        assert key in rows, (key, text)
    assert "FLOPs per step" in text and "FLOP per device" in text, text
    # Per-device float32 params: a bit over half of the model (LayerNorms stay replicated).
    params_mib = float(rows["params"].split("MiB")[0].replace(",", ""))
    cfg = plan.load_config("configs/pretrain.py:tiny,mode=smoke")
    task = tasks.build(cfg)
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(task.init_params,
                                                           jax.random.PRNGKey(0))))
    assert 0.5 <= params_mib * 2**20 / (4 * n) < 0.6, (params_mib, n)
    opt_mib = float(rows["optimizer state"].split("MiB")[0].replace(",", ""))
    assert opt_mib == pytest.approx(2 * params_mib, rel=0.01)  # Adam mu + nu (rounded MiB)


def test_fit_verdict():
    p = plan.Plan(variant="x", mesh={"data": 1, "fsdp": 8, "tensor": 1}, rules="fsdp",
                  dtype="bfloat16/float32", remat="full", batch_size=8, n_params=10,
                  state=dict.fromkeys(plan.GROUPS, 0), batch_bytes=0, argument_bytes=30 * 10**9,
                  output_bytes=30 * 10**9, alias_bytes=30 * 10**9, temp_bytes=9 * 10**9,
                  code_bytes=0, flops_per_device=1e12, device_memory_gb=40)
    assert p.total_bytes == 39 * 10**9 and p.fits
    assert "fits in 40 GB per device (39.00 GB needed, 98%)" in plan.format_plan(p)
    p.device_memory_gb = 32
    assert not p.fits and "does NOT fit in 32 GB" in plan.format_plan(p)


def test_activation_constraints_follow_the_preset(mesh8):
    """Attention / MLP activations get sharding constraints only when traced under a preset's
    rules (as `trainer.compile_step` does): batch over ('data', 'fsdp') and, for `fsdp_tp`,
    heads and MLP hidden over `tensor`."""
    from mplug_jax.models import layers

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + layers.Attention(num_heads=2)(x)
            return x + layers.Mlp(mlp_dim=64)(x)

    x = np.zeros((8, 4, 32), np.float32)
    params = Block().init(jax.random.PRNGKey(0), x)
    mesh = shd.make_mesh(MESHES["fsdp_tp"])

    def lowered_text(rules):
        fn = jax.jit(lambda p, x: Block().apply(p, x))
        with jax.set_mesh(mesh), layers.activation_sharding(rules):
            return fn.lower(params, x).as_text()

    assert "sharding_constraint" not in lowered_text(())
    tp = lowered_text(shd.rules("fsdp_tp"))
    dp = lowered_text(shd.rules("dp"))
    # q, k, v, context (4) + attention out, MLP hidden, MLP out (3) = 7 per block.
    assert tp.count("sharding_constraint") == dp.count("sharding_constraint") == 7
    assert '[{"data", "fsdp"}, {}, {"tensor"}]' in tp  # MLP hidden
    assert '[{"data", "fsdp"}, {}, {"tensor"}, {}]' in tp  # q / k / v / context
    assert '{"tensor"}]' not in dp and '{"tensor"}, {}]' not in dp
