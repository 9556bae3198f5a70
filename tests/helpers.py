"""Small helpers several test files share (imported by name: `from helpers import ...`)."""
import pytest


def set_path(config, path: str, value) -> None:
    """Set the dotted `path` ('task.itc.queue_size') of a ConfigDict to `value`."""
    *parents, key = path.split(".")
    for name in parents:
        config = config[name]
    config[key] = value


def assert_rejected(make_config, build, cases, error=ValueError) -> None:
    """For each `(path, value, match)` of `cases`: a fresh `make_config()` with `path` set to
    `value` makes `build(config)` raise `error` matching `match`."""
    for path, value, match in cases:
        c = make_config()
        set_path(c, path, value)
        with pytest.raises(error, match=match):
            build(c)


# A two-layer mPLUG of width 32 at 32 px (2 x 2 patches): the task unit tests' model.
SMALL_MODEL = dict(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1, fusion_layers=2,
                   fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16,
                   vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16)


def built_task(config, seed: int = 0):
    """(`tasks.build(config)`, its unboxed initial params from PRNGKey(`seed`))."""
    import flax.linen as nn
    import jax

    from mplug_jax import tasks

    task = tasks.build(config)
    return task, nn.meta.unbox(task.init_params(jax.random.PRNGKey(seed)))
