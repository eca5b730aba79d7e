"""Tokenizer: training, loading, encoding contract (BOT ... EOT pad), round trips."""

import os
import pickle
import re
import subprocess
import sys

import chex
import numpy as np
import pytest
import sentencepiece as spm

from clip_jax.data.errors import DataError
from clip_jax.data.tokenizer import Tokenizer, clean_text, load_tokenizer, train_tokenizer

CORPUS = [
    "a photo of a dog on the beach",
    "two cats sleeping on a red sofa",
    "A man riding a bicycle down the street",
    "the sun sets over the mountains",
    "a bowl of fruit with apples and bananas",
    "children playing football in a park",
    "an old car parked near a brick wall",
    "a close-up of a yellow flower",
] * 40


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "sp"), 300)


def test_encode_layout_and_special_ids(model_path):
    tok = Tokenizer(model_path, context_length=16)
    out = tok.encode(["a photo of a dog", ""])
    chex.assert_shape(out, (2, 16))
    chex.assert_type(out, np.int32)
    for row in out:
        assert row[0] == tok.bot_id
        eot = int(np.argmax(row == tok.eot_id))
        assert row[eot] == tok.eot_id
        assert (row[eot + 1 :] == tok.pad_id).all()
        assert tok.eot_id not in row[:eot] and tok.pad_id not in row[:eot]
    assert out[1, 1] == tok.eot_id  # empty caption: [BOT, EOT, pad...]
    assert (tok.pad_id, tok.bot_id, tok.eot_id) == (0, 2, 3)
    chex.assert_shape(tok.encode("a dog"), (16,))


def test_round_trip_ascii_and_non_ascii(model_path):
    tok = Tokenizer(model_path, context_length=77, lowercase=False)
    texts = [
        "A photo of a Dog on the beach!",
        "Ein Bär über dem Fluß — naïve café",
        "東京の夜景と富士山",
        "emoji 🌸🐈 and Ελληνικά, русский текст",
        "tabs\tand  spaces",
    ]
    for t, row in zip(texts, tok.encode(texts)):
        assert tok.decode(row) == clean_text(t, "clip", lowercase=False)
    tok_lower = Tokenizer(model_path)
    assert tok_lower.decode(tok_lower.encode("Ein BÄR")) == "ein bär"


def test_long_caption_truncated_keeps_eot(model_path):
    tok = Tokenizer(model_path, context_length=12)
    long = " ".join(["children playing football in a park"] * 20)
    row = tok.encode([long])[0]
    assert row[-1] == tok.eot_id and row[0] == tok.bot_id
    assert int(np.argmax(row == tok.eot_id)) == 11
    assert (row[1:-1] != tok.pad_id).all()
    assert long.startswith(tok.decode(row))


def test_eot_never_produced_by_text(model_path):
    tok = Tokenizer(model_path, context_length=64)
    nasty = "</s> <s> <end_of_text> <start_of_text> <pad> <unk> \x00\x03 ▁"
    row = tok.encode(nasty)
    eot = int(np.argmax(row == tok.eot_id))
    assert tok.eot_id not in row[:eot] and tok.bot_id not in row[1:]
    # Round trip too (except U+2581, which sentencepiece reserves as its space marker).
    plain = nasty.replace(" ▁", "")
    assert tok.decode(tok.encode(plain)) == clean_text(plain)


def test_clean_text_like_clip():
    assert clean_text("  A&amp;amp;B \n\n  Caf\u0065\u0301  ") == "a&b café"
    assert clean_text("  Keep  CASE ", "whitespace", lowercase=False) == "Keep CASE"
    assert clean_text(" x  ", "none", lowercase=False) == " x  "


def test_settings_recorded_and_pickle(model_path, tmp_path):
    path = train_tokenizer(CORPUS, str(tmp_path / "cased"), 300, lowercase=False)
    tok = Tokenizer(path, context_length=20)
    assert tok.lowercase is False
    assert tok.decode(tok.encode("A Dog")) == "A Dog"
    clone = pickle.loads(pickle.dumps(tok))
    chex.assert_trees_all_equal(clone.encode(["A Dog", "x"]), tok.encode(["A Dog", "x"]))
    assert clone.context_length == 20 and clone.lowercase is False


def test_training_is_deterministic(tmp_path):
    a = Tokenizer(train_tokenizer(CORPUS, str(tmp_path / "a"), 300))
    b = Tokenizer(train_tokenizer(CORPUS, str(tmp_path / "b"), 300))
    assert [a.id_to_piece(i) for i in range(a.vocab_size)] == [
        b.id_to_piece(i) for i in range(b.vocab_size)
    ]


def test_external_model_without_bos_eos(tmp_path):
    prefix = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=prefix,
        vocab_size=60,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    tok = Tokenizer(prefix + ".model", context_length=40)
    n = tok._sp.get_piece_size()
    assert tok.eot_id == n and tok.bot_id == n + 1 and tok.vocab_size == n + 2
    row = tok.encode("a photo of a dog")
    assert row[0] == tok.bot_id and tok.eot_id in row
    assert tok.decode(row) == "a photo of a dog"


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found: .*nope.model"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load sentencepiece model"):
        Tokenizer(str(bad))
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(train_tokenizer(CORPUS, str(tmp_path / "c"), 300), context_length=1)


def test_cli(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(CORPUS), encoding="utf-8")
    out = str(tmp_path / "cli_sp")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.data.tokenizer",
            f"--captions={caps}",
            f"--output={out}",
            "--vocab_size=300",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "eot_id=3" in res.stdout and os.path.isfile(out + ".model")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.data.tokenizer",
            f"--captions={tmp_path / 'missing.txt'}",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "missing.txt" in res.stderr


def test_load_tokenizer_for_the_trainer(model_path, tmp_path):
    tok = load_tokenizer(model_path, dataset="anything", context_length=20, lowercase=True)
    assert tok.context_length == 20 and tok.model_path == model_path
    demo = load_tokenizer("", dataset="clip_demo", data_dir=str(tmp_path), context_length=16)
    assert demo.model_path.startswith(str(tmp_path))
    chex.assert_shape(demo.encode("a red circle"), (16,))
    with pytest.raises(DataError, match=r"python -m clip_jax.data.tokenizer --dataset=my_set"):
        load_tokenizer("", dataset="my_set", data_dir=str(tmp_path))


def _tokenizer_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.data.tokenizer", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        check=False,
    )


def _assert_one_line_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.strip().count("\n") == 0, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)


def test_cli_vocabulary_size_hints_name_a_size_that_works(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(CORPUS), encoding="utf-8")
    out = str(tmp_path / "sp")
    # Too large for 8 distinct sentences: the hint names the largest size that trains.
    res = _tokenizer_cli(f"--captions={caps}", f"--output={out}", "--vocab_size=32000")
    _assert_one_line_error(res, "--vocab_size=32000 is more than", "--soft_vocab_limit")
    most = int(re.search(r"pass --vocab_size=(\d+) or less", res.stderr).group(1))
    res = _tokenizer_cli(f"--captions={caps}", f"--output={out}", f"--vocab_size={most}")
    assert res.returncode == 0 and f"vocab_size={most}," in res.stdout, res.stderr
    # Many distinct characters (CJK): too small a vocabulary; the hint's size trains, and
    # sentencepiece's own option --character_coverage is there.
    rng = np.random.default_rng(0)
    chars = [chr(0x4E00 + i) for i in range(300)]
    caps.write_text("\n".join("".join(rng.choice(chars, 10)) for _ in range(200)), encoding="utf-8")
    res = _tokenizer_cli(f"--captions={caps}", f"--output={out}", "--vocab_size=100")
    _assert_one_line_error(res, "--vocab_size=100 is less than", "--character_coverage")
    least = int(re.search(r"pass --vocab_size=(\d+) or more", res.stderr).group(1))
    res = _tokenizer_cli(f"--captions={caps}", f"--output={out}", f"--vocab_size={least}")
    assert res.returncode == 0 and f"vocab_size={least}," in res.stdout, res.stderr
    res = _tokenizer_cli(
        f"--captions={caps}", f"--output={out}", "--vocab_size=100", "--character_coverage=0.98"
    )
    _assert_one_line_error(res, "--character_coverage=0.98")
    res = _tokenizer_cli(f"--captions={caps}", f"--output={out}", "--character_coverage=0.5")
    _assert_one_line_error(res, "--character_coverage must be in [0.98, 1]")


def test_cli_captions_in_another_encoding(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_bytes("\n".join(CORPUS + ["un café crème"]).encode("latin-1"))
    out = str(tmp_path / "sp")
    res = _tokenizer_cli(f"--captions={caps}", f"--output={out}", "--vocab_size=300")
    _assert_one_line_error(
        res, f"line {len(CORPUS) + 1} of {caps} is not valid utf-8", "--encoding"
    )
    res = _tokenizer_cli(
        f"--captions={caps}", f"--output={out}", "--vocab_size=300", "--encoding=latin-1"
    )
    assert res.returncode == 0, res.stderr
    tok = Tokenizer(out + ".model")
    assert tok.decode(tok.encode("un café crème")) == "un café crème"
    _assert_one_line_error(
        _tokenizer_cli(f"--captions={caps}", f"--output={out}", "--encoding=klingon"),
        "unknown --encoding 'klingon'",
    )
    _assert_one_line_error(
        _tokenizer_cli(f"--captions={caps}", "--output=/proc/no/such/sp", "--encoding=latin-1"),
        "cannot write",
    )


def test_cli_reports_the_captions_the_training_context_cuts(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(CORPUS), encoding="utf-8")
    out = str(tmp_path / "cut_sp")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.data.tokenizer",
            f"--captions={caps}",
            f"--output={out}",
            "--vocab_size=300",
            "--context_length=27",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    # Reference: sentencepiece's own piece count; a row holds BOT, 25 pieces and EOT.
    tok = Tokenizer(out + ".model")
    pieces = [len(tok._sp.encode(tok.normalize(c))) for c in CORPUS[:10_000]]
    share = sum(n > 25 for n in pieces) / len(pieces)
    assert 0 < share < 1
    assert f"{share:.1%} of the first {len(pieces)}" in res.stdout
