"""The error raised by the official-checkpoint interop (key mapping, file I/O, configs)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model: names the file or the
    offending keys."""
