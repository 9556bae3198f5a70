"""Per-task inputs: each module is a task's record source (official or synthetic) and its
``to_example(record, rng, **options) -> dict``; `mplug_jax.data.pipeline` builds the training
batches from them (``train_batches(config, process_index, process_count)``) and
`mplug_jax.data.eval_loader` the evaluation batches."""
from __future__ import annotations


def json_annotations(input_cfg, split: str, what: str) -> list[str]:
    """`input.annotations` (split 'train') or `input.eval_annotations` (any other split) as a
    list of files; a clear ValueError naming the key and `what` they should be when unset."""
    key = "annotations" if split == "train" else "eval_annotations"
    files = input_cfg.get(key)
    if not files:
        raise ValueError(f"input.dataset='json' needs input.{key} ({what})")
    return [files] if isinstance(files, str) else list(files)
