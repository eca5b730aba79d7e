"""Image->text and text->image recall@K, with several captions per image.

Computed blockwise with ``ranked_neighbours``: the ``[images, captions]`` similarity matrix is
never built, so memory is ``O(query_block x key_block + query_block x K)`` besides the
embeddings themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from clip_jax.eval.metrics.neighbours import ranked_neighbours
from clip_jax.models.clip import l2_normalize


def retrieval_recall(
    image_emb,
    text_emb,
    text_to_image,
    ks: Sequence[int] = (1, 5, 10),
    *,
    query_block: int = 1024,
    key_block: int = 4096,
    mesh: jax.sharding.Mesh | None = None,
    normalize: bool = True,
    precision: str = "highest",
) -> dict:
    """Image->text and text->image recall@K with several captions per image.

    image_emb ``[N, D]``; text_emb ``[M, D]``; ``text_to_image[j]`` is the image of caption j.
    i2t_R@K: fraction of images (with at least one caption) having any of their captions among
    their K most similar captions. t2i_R@K: fraction of captions whose image is among their K
    most similar images. With ``mesh``, each query block is split over all its devices.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    t2i = np.asarray(text_to_image).astype(np.int64).reshape(-1)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb {image_emb.shape} and text_emb {text_emb.shape} must be [N, D] and "
            "[M, D] with the same D"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    if t2i.shape[0] != m:
        raise ValueError(
            f"text_to_image has {t2i.shape[0]} entries; expected one per caption ({m})"
        )
    if n == 0 or m == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {n} and {m}")
    bad = (t2i < 0) | (t2i >= n)
    if np.any(bad):
        raise ValueError(
            f"text_to_image holds {int(t2i[bad][0])}; expected image indices in 0..{n - 1}"
        )
    if normalize:
        image_emb = np.asarray(l2_normalize(image_emb))
        text_emb = np.asarray(l2_normalize(text_emb))
    kmax = max(ks)
    kw = dict(query_block=query_block, key_block=key_block, mesh=mesh, precision=precision)

    out = {}
    # image -> text
    nn_text = ranked_neighbours(image_emb, text_emb, kmax, **kw)  # [N, K]
    owner = np.where(nn_text >= 0, t2i[np.maximum(nn_text, 0)], -1)  # image of each hit
    own = owner == np.arange(n)[:, None]
    has_caption = np.bincount(t2i, minlength=n) > 0
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(np.any(own[has_caption, :k], axis=1)))
    # text -> image
    nn_image = ranked_neighbours(text_emb, image_emb, kmax, **kw)  # [M, K]
    hit = nn_image == t2i[:, None]
    for k in ks:
        out[f"t2i_R@{k}"] = float(np.mean(np.any(hit[:, :k], axis=1)))
    out["num_images"] = int(has_caption.sum())
    out["num_texts"] = int(m)
    return out
