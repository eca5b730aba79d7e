"""Sentencepiece tokenizer for captions: train, load, encode to fixed-length int32 rows.

Every encoded row is ``[BOT] ids... [EOT] pad pad ...`` with exactly ``context_length``
entries. Long captions are truncated *before* the end-of-text token, so every row holds
EOT, and the text tower can pool at the first position that holds ``eot_id``. EOT and BOT
are sentencepiece *control* symbols: no input text, whatever it contains (``</s>``,
``<end_of_text>``, control characters), ever encodes to them.

Text clean-up follows CLIP: HTML entities unescaped (twice), Unicode NFKC, runs of
whitespace collapsed to one space, ends stripped, then lowercasing. Both steps are
configurable; a model trained here records the settings it was trained with in a sidecar
``<prefix>.json`` and a `Tokenizer` loading it uses them unless told otherwise.

Command line::

    python -m clip_jax.data.tokenizer --captions=captions.txt --output=/tmp/sp --vocab_size=8000
    python -m clip_jax.data.tokenizer --dataset=my_set --data_dir=/data --output=/tmp/sp
"""

from __future__ import annotations

import argparse
import codecs
import html
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from clip_jax import cli, storage
from clip_jax.data import paths, truncation
from clip_jax.data.bpe import ClipBPETokenizer
from clip_jax.data.errors import DataError
from clip_jax.data.info import read_captions

__all__ = [
    "Tokenizer",
    "train_tokenizer",
    "load_tokenizer",
    "demo_tokenizer",
    "demo_tokenizer_path",
    "clean_text",
    "CLEAN_MODES",
]

CLEAN_MODES = ("clip", "whitespace", "none")
_WS = re.compile(r"\s+")

# Ids of the special pieces in models trained by `train_tokenizer`.
PAD_ID, UNK_ID, BOT_ID, EOT_ID = 0, 1, 2, 3
BOT_PIECE, EOT_PIECE = "<start_of_text>", "<end_of_text>"


def clean_text(text: str, clean: str = "clip", lowercase: bool = True) -> str:
    """CLIP-style caption clean-up.

    clean='clip': unescape HTML (twice, as CLIP does), NFKC, collapse whitespace, strip.
    clean='whitespace': collapse whitespace and strip only. clean='none': unchanged.
    """
    if clean not in CLEAN_MODES:
        raise ValueError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
    if clean == "clip":
        text = html.unescape(html.unescape(text))
        text = unicodedata.normalize("NFKC", text)
    if clean in ("clip", "whitespace"):
        text = _WS.sub(" ", text).strip()
    if lowercase:
        text = text.lower()
    return text


def _sidecar_path(model_path: str) -> str:
    root, _ = os.path.splitext(model_path)
    return root + ".json"


class Tokenizer:
    """Encodes batches of captions to int32 ``[B, context_length]``.

    Args:
      model_path: a sentencepiece ``.model`` file (trained here or anywhere else).
      context_length: row length, BOT and EOT included (>= 2).
      lowercase / clean: text clean-up (see `clean_text`); None = the settings recorded
        next to the model by `train_tokenizer`, else lowercase=True, clean='clip'.

    Special ids: `pad_id` (0; only ever after EOT), `bot_id`, `eot_id`. For a model
    without BOS/EOS pieces the missing ones are appended after the model's vocabulary
    (`vocab_size` counts them). Instances pickle by value (the model bytes travel), so they
    can be sent to loader worker processes.
    """

    def __init__(
        self,
        model_path: str,
        context_length: int = 77,
        lowercase: bool | None = None,
        clean: str | None = None,
    ):
        model_path = os.fspath(model_path)
        model = storage.path(model_path)
        with storage.access(model_path, "read"):
            if not model.is_file():
                raise DataError(
                    f"tokenizer model not found: {model_path} (expected a sentencepiece "
                    ".model file; train one with `python -m clip_jax.data.tokenizer`)"
                )
            proto = model.read_bytes()
            sidecar = storage.path(_sidecar_path(model_path))
            settings = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if lowercase is None:
            lowercase = bool(settings.get("lowercase", True))
        if clean is None:
            clean = settings.get("clean", "clip")
        self._setup(proto, model_path, context_length, lowercase, clean)

    def _setup(
        self, proto: bytes, model_path: str, context_length: int, lowercase: bool, clean: str
    ):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (BOT and EOT), got {context_length}")
        if clean not in CLEAN_MODES:
            raise ValueError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
        self._proto = proto
        self.model_path = model_path
        self.context_length = int(context_length)
        self.lowercase = bool(lowercase)
        self.clean = clean
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError
            raise DataError(f"cannot load sentencepiece model {model_path}: {e}") from None
        self._sp = sp
        n = sp.get_piece_size()
        extra = 0
        self.eot_id = sp.eos_id() if sp.eos_id() >= 0 else n + extra
        extra += sp.eos_id() < 0
        self.bot_id = sp.bos_id() if sp.bos_id() >= 0 else n + extra
        extra += sp.bos_id() < 0
        self.pad_id = 0
        self.vocab_size = n + extra
        self._specials = {self.eot_id, self.bot_id, self.pad_id}
        if sp.pad_id() >= 0:
            self._specials.add(sp.pad_id())

    def __reduce__(self):
        return (
            _rebuild_tokenizer,
            (self._proto, self.model_path, self.context_length, self.lowercase, self.clean),
        )

    def __repr__(self):
        return (
            f"Tokenizer({self.model_path!r}, context_length={self.context_length}, "
            f"vocab_size={self.vocab_size}, lowercase={self.lowercase}, clean={self.clean!r})"
        )

    def normalize(self, text: str) -> str:
        return clean_text(text, self.clean, self.lowercase)

    def encode(self, texts: Sequence[str] | str) -> np.ndarray:
        """list of B strings -> int32 [B, context_length]; a single string -> [context_length]."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = self._sp.encode([self.normalize(t) for t in batch], out_type=int)
        out = np.full((len(batch), self.context_length), self.pad_id, dtype=np.int32)
        keep = self.context_length - 2
        for row, seq in zip(out, ids):
            seq = seq[:keep]
            row[0] = self.bot_id
            row[1 : 1 + len(seq)] = seq
            row[1 + len(seq)] = self.eot_id
        return out[0] if single else out

    __call__ = encode

    def decode(self, tokens) -> list[str] | str:
        """int [B, L] -> list of B strings ([L] -> one string): the text between BOT and EOT."""
        arr = np.asarray(tokens)
        single = arr.ndim == 1
        rows = arr[None] if single else arr
        n = self._sp.get_piece_size()
        texts = []
        for row in rows.tolist():
            if self.eot_id in row:
                row = row[: row.index(self.eot_id)]
            row = [t for t in row if t not in self._specials and 0 <= t < n]
            texts.append(self._sp.decode(row))
        return texts[0] if single else texts

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def _rebuild_tokenizer(proto, model_path, context_length, lowercase, clean):
    tok = Tokenizer.__new__(Tokenizer)
    tok._setup(proto, model_path, context_length, lowercase, clean)
    return tok


def train_tokenizer(
    captions: Iterable[str],
    model_prefix: str,
    vocab_size: int = 8000,
    *,
    lowercase: bool = True,
    clean: str = "clip",
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    hard_vocab_limit: bool = True,
    max_sentences: int = 5_000_000,
    num_threads: int = 1,
    seed_sentencepiece_size: int = 1_000_000,
    seed: int = 0,
) -> str:
    """Trains a sentencepiece model on captions; writes ``<prefix>.model`` (and ``.vocab``
    and the ``.json`` clean-up settings); returns the ``.model`` path.

    Ids: pad 0, unk 1, BOT 2, EOT 3 (control symbols). With byte_fallback (default) any
    character outside the vocabulary is spelled in bytes, so decode(encode(x)) == clean(x)
    for every string. With num_threads=1 training is deterministic given `seed` (the
    sentence sample and the pieces are the same on every run).
    """
    if clean not in CLEAN_MODES:
        raise ValueError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
    prefix = os.fspath(model_prefix)
    if os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)

    count = [0]
    reading_error = []  # sentencepiece would wrap it in its own RuntimeError

    def sentences():
        try:
            for c in captions:
                t = clean_text(c, clean, lowercase)
                if t:
                    count[0] += 1
                    yield t
        except DataError as e:
            reading_error.append(e)

    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=prefix,
            vocab_size=int(vocab_size),
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            hard_vocab_limit=hard_vocab_limit,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            seed_sentencepiece_size=seed_sentencepiece_size,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOT_ID,
            eos_id=EOT_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece=BOT_PIECE,
            eos_piece=EOT_PIECE,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            minloglevel=2,
        )
        if reading_error:
            raise reading_error[0]
    except RuntimeError as e:
        if reading_error:
            raise reading_error[0] from None
        if count[0] == 0:
            raise DataError(
                "no captions to train the tokenizer on (all empty after clean-up)"
            ) from None
        raise DataError(_training_error(str(e), vocab_size, character_coverage)) from None
    with open(prefix + ".json", "w") as f:
        json.dump(
            {
                "lowercase": lowercase,
                "clean": clean,
                "vocab_size": int(vocab_size),
                "model_type": model_type,
                "num_sentences": count[0],
            },
            f,
            indent=1,
        )
    return prefix + ".model"


def _training_error(message: str, vocab_size: int, character_coverage: float) -> str:
    """sentencepiece's failure as a one-line fix in this command line's options: the
    vocabulary sizes the corpus supports are spelled out (sentencepiece names them in its
    own words and flag names)."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        most = int(too_high.group(2))
        return (
            f"--vocab_size={vocab_size} is more than these captions support (at most {most} "
            f"pieces); pass --vocab_size={most} or less, or --soft_vocab_limit to take what "
            "they support, or train on more captions"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        least = int(too_low.group(2))
        lower = (
            ", or a lower --character_coverage (down to 0.98: rarer characters are then spelled "
            "in bytes)"
            if character_coverage > 0.98
            else ""
        )
        return (
            f"--vocab_size={vocab_size} is less than the {least} pieces these captions need "
            f"(their characters at --character_coverage={character_coverage}, plus the byte and "
            f"special pieces); pass --vocab_size={least} or more{lower}"
        )
    return f"sentencepiece training failed: {message.splitlines()[0] if message else 'unknown'}"


DEMO_VOCAB_SIZE = 512


def demo_tokenizer_path(data_dir: str | None = None) -> str:
    """Path of the clip_demo sentencepiece model: trained once (deterministically, < 1 s)
    from every caption the demo can produce, cached in `data_dir/clip_demo/tokenizer/`."""
    from clip_jax.data.builders import clip_demo  # noqa: PLC0415 (imports tensorflow_datasets)

    d = paths.resolve_data_dir(data_dir)
    folder = storage.join(d, clip_demo.NAME, "tokenizer")
    name = f"clip_demo_v{clip_demo.VERSION}_bpe{DEMO_VOCAB_SIZE}"
    path = storage.join(folder, name + ".model")
    if storage.is_remote(d):
        if storage.is_file(path):
            return path
        # Trained locally, then uploaded (.model last: its presence means complete).
        local = tempfile.mkdtemp(prefix="clip_jax_tokenizer_")
        try:
            demo_tokenizer_path(local)
            built = os.path.join(local, clip_demo.NAME, "tokenizer")
            for ext in (".vocab", ".json", ".model"):
                with open(os.path.join(built, name + ext), "rb") as f:
                    data = f.read()
                with storage.access(folder, "write"):
                    (storage.path(folder) / (name + ext)).write_bytes(data)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return path
    stem = os.path.join(folder, name)
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        # Several hosts may train it at once (same bytes): unique temp names, atomic renames.
        tmp_prefix = os.path.join(folder, f".tmp_{socket.gethostname()}_{os.getpid()}")
        # BPE: on this tiny, repetitive corpus unigram keeps too few pieces; BPE learns every
        # word as one piece (byte fallback still covers any other text).
        train_tokenizer(
            clip_demo.all_caption_variants(),
            tmp_prefix,
            DEMO_VOCAB_SIZE,
            model_type="bpe",
            hard_vocab_limit=False,
            seed=0,
        )
        for ext in (".vocab", ".json", ".model"):  # .model last: its presence means complete
            os.replace(tmp_prefix + ext, stem + ext)
    return path


def demo_tokenizer(data_dir: str | None = None, context_length: int = 77) -> Tokenizer:
    """A `Tokenizer` for clip_demo captions (see `demo_tokenizer_path`)."""
    return Tokenizer(demo_tokenizer_path(data_dir), context_length=context_length)


# config.tokenizer.kind: a sentencepiece model (default, for training from scratch) or the
# CLIP BPE of pretrained OpenAI/OpenCLIP/HF models (clip_jax.data.bpe, shipped vocabulary).
TOKENIZER_KINDS = ("sentencepiece", "clip_bpe")


def load_tokenizer(
    path: str | None,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    context_length: int = 77,
    lowercase: bool | None = None,
    clean: str | None = None,
    kind: str = "sentencepiece",
) -> Tokenizer | ClipBPETokenizer:
    """The trainer's entry point (config.tokenizer.*).

    kind='clip_bpe': the CLIP BPE tokenizer (path must be empty; it lowercases and cleans
    as CLIP does). kind='sentencepiece': path is a sentencepiece .model. Empty/None: the
    demo tokenizer when dataset is clip_demo (trained on first use, cached under
    data_dir/clip_demo/tokenizer/); for any other dataset a DataError saying how to train one.
    """
    if kind not in TOKENIZER_KINDS:
        raise DataError(f"tokenizer kind {kind!r} is unknown; allowed: {TOKENIZER_KINDS}")
    if kind == "clip_bpe":
        if path:
            raise DataError(
                f"tokenizer.path {path!r} is set but tokenizer.kind='clip_bpe' uses the "
                "packaged CLIP vocabulary; leave tokenizer.path empty"
            )
        return ClipBPETokenizer(context_length=context_length)
    if path:
        return Tokenizer(path, context_length=context_length, lowercase=lowercase, clean=clean)
    if dataset == "clip_demo":
        return Tokenizer(
            demo_tokenizer_path(data_dir),
            context_length=context_length,
            lowercase=lowercase,
            clean=clean,
        )
    d = paths.resolve_data_dir(data_dir)
    raise DataError(
        f"no tokenizer given for dataset {dataset!r} (tokenizer.path is empty); "
        f"train one with: python -m clip_jax.data.tokenizer --dataset={dataset} "
        f"--data_dir={d} --output={d}/{dataset}_sp --vocab_size=32000"
    )


def _read_caption_file(path: str, encoding: str = "utf-8") -> Iterable[str]:
    if not os.path.isfile(path):
        raise DataError(
            f"captions file not found: {path} (expected a text file, one caption a line)"
        )
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                yield line.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(
                    f"line {n} of {path} is not valid {encoding}; pass the file's --encoding "
                    "(e.g. --encoding=cp1252 or latin-1)"
                ) from None


TRUNCATION_SAMPLE = 10_000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clip_jax.data.tokenizer",
        description="Train a sentencepiece tokenizer on captions.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", nargs="+", help="text file(s), one caption per line")
    src.add_argument("--dataset", help="a prepared dataset name (captions of --split)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--output", required=True, help="model prefix: writes PREFIX.model")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "word", "char"])
    p.add_argument("--no_lowercase", action="store_true")
    p.add_argument("--clean", default="clip", choices=CLEAN_MODES)
    p.add_argument(
        "--soft_vocab_limit",
        action="store_true",
        help="allow a smaller vocabulary than asked for when the corpus is small",
    )
    p.add_argument(
        "--character_coverage",
        type=float,
        default=0.9995,
        help="fraction of the characters that get pieces of their own; the rarest others are "
        "spelled in bytes (sentencepiece's option; lower it for scripts with many characters)",
    )
    p.add_argument("--encoding", default="utf-8", help="text encoding of the --captions files")
    p.add_argument(
        "--context_length",
        type=int,
        default=77,
        help="the training context (tokenizer.context_length): reports the captions it cuts",
    )
    args = p.parse_args(argv)

    def body():
        try:
            if not 0.98 <= args.character_coverage <= 1:  # sentencepiece's own range
                raise DataError(
                    f"--character_coverage must be in [0.98, 1], got {args.character_coverage}"
                )
            if args.vocab_size < 1:
                raise DataError(f"--vocab_size must be a positive number, got {args.vocab_size}")
            if args.context_length < 2:
                raise DataError(
                    f"--context_length must be >= 2 (BOT and EOT), got {args.context_length}"
                )
            try:
                codecs.lookup(args.encoding)
            except LookupError:
                raise DataError(
                    f"unknown --encoding {args.encoding!r} (e.g. utf-8, cp1252)"
                ) from None
            if args.captions:
                captions = (
                    c for path in args.captions for c in _read_caption_file(path, args.encoding)
                )
            else:
                captions = (
                    c
                    for caps in read_captions(args.dataset, args.split, args.data_dir)
                    for c in caps
                )
            sample: list[str] = []  # the first captions, for the truncation report

            def recorded(texts):
                for text in texts:
                    if len(sample) < TRUNCATION_SAMPLE:
                        sample.append(text)
                    yield text

            path = train_tokenizer(
                recorded(captions),
                args.output,
                args.vocab_size,
                lowercase=not args.no_lowercase,
                clean=args.clean,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                hard_vocab_limit=not args.soft_vocab_limit,
            )
        except DataError:
            raise  # DatasetNotPreparedError is an OSError too: its message stands
        except OSError as e:  # --output in a folder that cannot be created or written
            where = f" {e.filename}" if e.filename else ""
            raise DataError(f"cannot write{where}: {e.strerror or e}; pass another --output") from e
        tok = Tokenizer(path, context_length=args.context_length)
        print(
            f"wrote {path} (vocab_size={tok.vocab_size}, bot_id={tok.bot_id}, "
            f"eot_id={tok.eot_id}, pad_id={tok.pad_id})"
        )
        cut = truncation.truncated(tok, sample)
        print(
            f"captions longer than --context_length={args.context_length} (cut in training): "
            f"{cut.mean():.1%} of the first {len(sample)}"
        )

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
