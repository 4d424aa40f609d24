"""User-facing errors.

Every problem a user can cause (bad input file, bad config, wrong checkpoint) raises a `VargptError`
subclass whose message names the problem and the fix in one line. The CLI prints that line and exits
non-zero; anything else is a bug and shows a traceback only with ``--debug``.
"""


class VargptError(Exception):
    """A problem with the user's input, with a one-line message that says how to fix it."""


class ConfigError(VargptError):
    """A config field is missing, unknown or out of range."""


class InputError(VargptError):
    """An input (image, prompt, tensor) is unusable."""


class CheckpointError(VargptError):
    """A checkpoint directory is incomplete or does not match its config."""
