"""Task names as run configs spell them, and today's spelling of each.

Kept apart from the `mplug_jax.tasks` registry so that code below the tasks (the workdir's
resume check) can compare task names without importing any task.
"""
from __future__ import annotations

# Names written by earlier versions (config.json of old workdirs) -> today's names.
RENAMED = {"mplug2_video_qa": "mplug2.video_qa", "mplug2_video_caption": "mplug2.video_caption",
           "mplug2_retrieval": "mplug2.retrieval", "mplug2_pretrain": "mplug2.pretrain"}


def canonical(name: str) -> str:
    """Today's spelling of a task name (old workdirs name the mPLUG-2 tasks `mplug2_*`)."""
    return RENAMED.get(name, name)
