"""The CLIP BPE tokenizer against open_clip's ids (committed fixture, made by
tests/fixtures/make_parity_fixtures.py; open_clip is not needed here)."""

import gzip
import json
import os
import pickle

import chex
import numpy as np
import pytest

from clip_jax.data.bpe import ClipBPETokenizer, clean_caption, split_words
from clip_jax.data.errors import DataError
from clip_jax.data.tokenizer import load_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bpe_parity.json.gz")


@pytest.fixture(scope="module")
def tokenizer():
    return ClipBPETokenizer()


@pytest.fixture(scope="module")
def parity():
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return json.load(f)


def test_ids_equal_open_clip_on_fixture_captions(tokenizer, parity):
    captions = parity["captions"]
    assert len(captions) >= 2000
    expected = np.zeros((len(captions), parity["context_length"]), np.int32)
    for row, ids in zip(expected, parity["ids"]):
        row[: len(ids)] = ids
    got = tokenizer.encode(captions)
    chex.assert_shape(got, expected.shape)
    chex.assert_type(got, np.int32)
    bad = [i for i in range(len(captions)) if not np.array_equal(got[i], expected[i])]
    assert not bad, f"{len(bad)} captions differ, first: {captions[bad[0]]!r}"


def test_fixture_is_varied(parity):
    text = "".join(parity["captions"])
    for needle in ("&amp;", "é", "東", "🎉", "'s", "“", "ﬁ", "２" if "２" in text else "Ｆ"):
        assert needle in text
    assert max(len(ids) for ids in parity["ids"]) == 77  # truncated captions are included


def test_special_ids_and_sizes(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.bot_id, tokenizer.eot_id, tokenizer.pad_id) == (49406, 49407, 0)
    assert tokenizer.context_length == 77
    row = tokenizer.encode("a photo of a dog.")
    # The well-known CLIP ids of these words ("a" 320, "photo" 1125, "of" 539, "dog" 1929).
    chex.assert_trees_all_equal(row[:8], np.array([49406, 320, 1125, 539, 320, 1929, 269, 49407]))
    assert not row[8:].any()


def test_truncation_keeps_the_end_token():
    tok = ClipBPETokenizer(context_length=10)
    row = tok.encode("one two three four five six seven eight nine ten eleven")
    chex.assert_shape(row, (10,))
    assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] != 49407).all()


def test_clean_up_and_words():
    assert clean_caption("  A &amp;amp; B\n\tC  ") == "a & b c"
    assert clean_caption("“Quote” ﬁne ＡＢ") == '"quote" fine ab'
    assert split_words("it's 42 dogs!!") == ["it", "'s", "4", "2", "dogs", "!!"]


def test_decode_inverts_encode_up_to_clean_up(tokenizer):
    text = "Two dogs, 3 cats & a café in Zürich!"
    assert tokenizer.decode(tokenizer.encode(text)) == "two dogs , 3 cats & a café in zürich !"
    rows = tokenizer.encode(["a", "b c"])
    assert tokenizer.decode(rows) == ["a", "b c"]


def test_pickles_by_reference(tokenizer):
    data = pickle.dumps(tokenizer)
    assert len(data) < 1000
    again = pickle.loads(data)
    chex.assert_trees_all_equal(again.encode(["x y z"]), tokenizer.encode(["x y z"]))


def test_selected_by_tokenizer_kind():
    tok = load_tokenizer("", kind="clip_bpe", context_length=32)
    assert isinstance(tok, ClipBPETokenizer) and tok.context_length == 32
    with pytest.raises(DataError, match="leave tokenizer.path empty"):
        load_tokenizer("x.model", kind="clip_bpe")
    with pytest.raises(DataError, match="'wordpiece' is unknown"):
        load_tokenizer("", kind="wordpiece")
