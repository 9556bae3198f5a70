"""Per-task input pipelines: an official or synthetic source turned into model-ready examples."""
