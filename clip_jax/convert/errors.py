"""The converter's one error type (a leaf module, so every part of the converter can raise it)."""

from clip_jax.errors import UserError


class ConvertError(UserError):
    """Bad input to the converter; the message is one line naming the file and the tensor."""
