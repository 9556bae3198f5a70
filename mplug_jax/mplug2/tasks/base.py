"""What every mPLUG-2 task shares on top of `mplug_jax.tasks.base.Task`: the model class
(`MPLUG2`; `MPLUG2WithHeads` for retrieval / pretraining), `init_params` over the dummy batch,
initialisation from a whole mPLUG-2 checkpoint (`mplug_jax.mplug2.checkpoint`: a converted
directory, an official file or an mPLUG-2 workdir) and its refusal of random weights and of
the mPLUG-only `init.clip` / `init.bert` sources.

Not a task itself (`mplug_jax.tasks.available` skips modules named `base`).
"""
from __future__ import annotations

import jax

from mplug_jax import pretrained
from mplug_jax.mplug2 import checkpoint
from mplug_jax.mplug2 import model as mplug2
from mplug_jax.tasks import base


class Task(base.Task):
    """Base of the mPLUG-2 tasks (module docstring).

    Subclasses set `title` (how errors name the config), `init_hint` (what the config starts
    from, for `require_init`) and `init_text` (the dummy-batch key prefixes of the text and
    the decoder inputs `init_params` feeds)."""

    model_cls = mplug2.MPLUG2
    capacity_hint = "nothing is dropped by this task"
    title = "mPLUG-2"
    init_hint = "fine-tunes a released mPLUG-2"
    init_text = ("text", "text")

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        if self.model.num_frames < 1:
            raise ValueError(f"model.num_frames must be >= 1, got {self.model.num_frames}")

    def init_params(self, rng: jax.Array):
        """Boxed params from the model's full forward on `dummy_batch(1)` (every parameter)."""
        b = self.dummy_batch(1)
        k_params, k_drop = jax.random.split(rng)
        txt, dec = self.init_text
        return self.model.init({"params": k_params, "dropout": k_drop}, b["video"],
                               b[f"{txt}_ids"], b[f"{txt}_mask"], b[f"{dec}_ids"],
                               b[f"{dec}_mask"])["params"]

    def init_from_pretrained(self, state):
        """Params (and the momentum copy, if kept) from `config.init.checkpoint` (the base
        initialisation over `load_pretrained`); refuses random weights unless
        `init.allow_scratch`, and the mPLUG sources `init.clip` / `init.bert`."""
        self.require_init(f"{self.title} config {self.init_hint}: set "
                          "--config.init.checkpoint=CONVERTED_DIR (`mplug-jax convert`) or an "
                          "mPLUG-2 workdir")
        init = self.config.get("init")
        if init and (init.get("clip") or init.get("bert")):
            raise ValueError(f"the {self.name} task loads whole mPLUG-2 checkpoints only "
                             "(init.checkpoint); init.clip / init.bert are for mPLUG")
        return super().init_from_pretrained(state)

    def load_pretrained(self, init_cfg) -> pretrained.Loaded:
        """`init.checkpoint` fitted to this model (`mplug2.checkpoint.load`); the release has
        no momentum copy, so a momentum copy starts equal to the loaded params."""
        flat, what = checkpoint.load(self.model, init_cfg, self.name)
        return pretrained.Loaded(flat, None, [what])
