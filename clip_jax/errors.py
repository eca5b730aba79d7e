"""The one base class of every error a user can cause (a bad flag, path, config or file).

Each package keeps its own subclass (`ConfigError`, `DataError`, `EvaluationError`...), so its
messages stay next to its code; the command lines (`clip_jax.cli`) catch `UserError` alone and
print it as one line. A leaf module: it imports nothing, so any module may import it.
"""


class UserError(ValueError):
    """A problem with the user's input: the message names the value at fault and the fix."""
