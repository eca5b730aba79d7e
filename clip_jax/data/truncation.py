"""Which texts a tokenizer cuts to fit its context (`tokenizer.context_length`).

Both tokenizers (sentencepiece and CLIP BPE) keep BOT, the first `context_length - 2` text
tokens and EOT, so a text is cut exactly when a copy of the tokenizer with one more position
puts a token in that last position.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np


def truncated(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """bool ``[len(texts)]``: True where ``tokenizer.encode`` drops tokens of the text.

    A tokenizer without a ``context_length`` (a test's lookup table) cuts nothing.
    """
    length = getattr(tokenizer, "context_length", None)
    if length is None or not len(texts):
        return np.zeros(len(texts), bool)
    longer = copy.copy(tokenizer)
    longer.context_length = length + 1
    return np.asarray(longer.encode(list(texts)))[:, length] != tokenizer.pad_id
