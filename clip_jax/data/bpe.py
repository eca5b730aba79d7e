"""The CLIP byte-level BPE tokenizer (49,408 tokens), as OpenAI CLIP and OpenCLIP use it.

Pretrained CLIP models only understand the ids of this tokenizer. Text goes through the
same steps as OpenCLIP's ``SimpleTokenizer``:

1. clean-up: the character-level fixes of ``ftfy.fix_text`` (HTML entities when the line
   has no ``<``, C1 controls as Windows-1252, Latin ligatures, full/half-width forms, curly
   quotes, terminal escapes, control characters, NFC; repeated to a fixed point), then
   HTML-unescape twice, collapse whitespace, strip, lowercase. ftfy's mojibake repair
   (re-decoding text that was decoded with the wrong codec) is not reproduced;
2. pre-tokenisation into words: the special tokens, the contractions ``'s 't 're 've 'm 'll
   'd``, runs of letters, single digits, runs of other non-space characters;
3. each word's UTF-8 bytes as printable characters, ``</w>`` on the last one, merged by
   rank with the 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``.

Rows are ``[49406] ids... [49407] 0 0 ...`` of ``context_length``; a longer row is cut to
``context_length`` and its last entry set to 49407, so every row holds the end token.
As in OpenCLIP, the literal text ``<start_of_text>`` / ``<end_of_text>`` encodes to the
special ids.

The merges file is the one OpenAI released with CLIP (MIT licence, copyright OpenAI), shipped
with this package so nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

__all__ = ["ClipBPETokenizer", "clean_caption", "VOCAB_PATH"]

VOCAB_PATH = os.path.join(os.path.dirname(__file__), "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2
BOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# ---------------------------------------------------------------- ftfy's character fixes

_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_C1_CONTROL = re.compile(r"[\x80-\x9f]")
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LINE_BREAKS = re.compile("\r\n|\r|\u2028|\u2029|\u0085")
_WHITESPACE = re.compile(r"\s+")
_LINES = re.compile(r"[^\n]*\n|[^\n]+")
_LIGATURES = str.maketrans(
    {
        "Ĳ": "IJ",
        "ĳ": "ij",
        "ŉ": "ʼn",
        "Ǳ": "DZ",
        "ǲ": "Dz",
        "ǳ": "dz",
        "Ǆ": "DŽ",
        "ǅ": "Dž",
        "ǆ": "dž",
        "Ǉ": "LJ",
        "ǈ": "Lj",
        "ǉ": "lj",
        "Ǌ": "NJ",
        "ǋ": "Nj",
        "ǌ": "nj",
        "ﬀ": "ff",
        "ﬁ": "fi",
        "ﬂ": "fl",
        "ﬃ": "ffi",
        "ﬄ": "ffl",
        "ﬅ": "ſt",
        "ﬆ": "st",
    }
)
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF]
    + list(range(0xFFF9, 0xFFFD))
)


def _width_map() -> dict[int, str]:
    table = {0x3000: " "}
    for i in range(0xFF01, 0xFFF0):
        alternate = unicodedata.normalize("NFKC", chr(i))
        if alternate != chr(i):
            table[i] = alternate
    return table


_WIDTH = _width_map()


def _html_entities() -> dict[str, str]:
    # Entities ending in ';' only, plus upper-cased names of lower-case ones that do not
    # already mean something else (ftfy reads '&EACUTE;' as 'É').
    table = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            table["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    table[upper] = char.upper()
    return table


_ENTITIES = _html_entities()


def _unescape_entity(match: re.Match) -> str:
    text = match.group(0)
    if text in _ENTITIES:
        return _ENTITIES[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _c1_as_cp1252(match: re.Match) -> str:
    try:
        return match.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d: no cp1252 character
        return match.group(0)


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY.sub(_unescape_entity, text)
        text = _C1_CONTROL.sub(_c1_as_cp1252, text)
        text = text.translate(_LIGATURES).translate(_WIDTH)
        text = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', text))
        text = _LINE_BREAKS.sub("\n", text)
        text = _ANSI_ESCAPE.sub("", text)
        text = text.translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def _fix_text(text: str) -> str:
    # Line by line, as ftfy does; once a line holds '<' (HTML?), no later line is unescaped.
    out, unescape = [], True
    for segment in _LINES.findall(text):  # split at '\n' only, as ftfy does
        unescape = unescape and "<" not in segment
        out.append(_fix_segment(segment, unescape))
    return "".join(out)


def clean_caption(text: str) -> str:
    """CLIP's clean-up: the ftfy fixes, HTML unescape (twice), whitespace collapsed, ends
    stripped, lowercased."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


# ---------------------------------------------------------------- pre-tokenisation


def _char_class(ch: str) -> str:
    """'L' (letter), 'N' (number), ' ' (white space) or 'O' (anything else)."""
    if ch.isspace():
        return " "
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "O"


def _same_letter(ch: str, letter: str) -> bool:
    # Case-insensitive as the reference pattern is: 'ſ' matches 's', 'K' (Kelvin) 'k'.
    return ch == letter or ch.lower() == letter or ch.upper() == letter.upper()


def _starts_with_contraction(text: str, i: int) -> int:
    for c in _CONTRACTIONS:
        end = i + len(c)
        if end <= len(text) and all(_same_letter(a, b) for a, b in zip(text[i:end], c)):
            return len(c)
    return 0


def split_words(text: str) -> list[str]:
    """The words of cleaned text: special tokens, contractions, runs of letters, single
    numbers, runs of other non-space characters (white space separates and is dropped)."""
    words, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        kind = _char_class(ch)
        if kind == " ":
            i += 1
            continue
        special = next((t for t in (BOT_TOKEN, EOT_TOKEN) if text.startswith(t, i)), None)
        length = len(special) if special else (ch == "'" and _starts_with_contraction(text, i))
        if not length:
            length = 1
            if kind != "N":
                while i + length < n and _char_class(text[i + length]) == kind:
                    length += 1
        words.append(text[i : i + length])
        i += length
    return words


# ---------------------------------------------------------------- byte-level BPE


def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes stand for themselves, the
    rest take the code points from 256 upwards in byte order. The dict's order (printable
    bytes first) is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


@functools.cache
def _load_merges(path: str) -> tuple[tuple[str, str], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; the tokenizer uses the first NUM_MERGES merges.
    return tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])


class ClipBPETokenizer:
    """Encodes batches of captions to int32 ``[B, context_length]`` with CLIP's BPE.

    The interface is the one of :class:`clip_jax.data.tokenizer.Tokenizer`: ``encode``
    (also ``__call__``), ``decode``, ``normalize``, ``vocab_size`` (49,408), ``bot_id``
    (49406), ``eot_id`` (49407), ``pad_id`` (0), ``context_length``.
    """

    def __init__(self, context_length: int = 77, vocab_path: str = VOCAB_PATH):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (BOT and EOT), got {context_length}")
        self.context_length = int(context_length)
        self.vocab_path = vocab_path
        merges = _load_merges(vocab_path)
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars]
        vocab += ["".join(m) for m in merges] + [BOT_TOKEN, EOT_TOKEN]
        self._encoder = {piece: i for i, piece in enumerate(vocab)}
        self._decoder = vocab
        self._ranks = {m: i for i, m in enumerate(merges)}
        self._byte_chars = bytes_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        self._cache = {BOT_TOKEN: (BOT_TOKEN,), EOT_TOKEN: (EOT_TOKEN,)}
        self.vocab_size = len(vocab)
        self.bot_id = self._encoder[BOT_TOKEN]
        self.eot_id = self._encoder[EOT_TOKEN]
        self.pad_id = 0

    def __reduce__(self):  # rebuilt from the packaged file, not sent as a 49k-entry dict
        return (ClipBPETokenizer, (self.context_length, self.vocab_path))

    def __repr__(self):
        return f"ClipBPETokenizer(context_length={self.context_length})"

    def normalize(self, text: str) -> str:
        return clean_caption(text)

    def _bpe(self, word: str) -> tuple[str, ...]:
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self._ranks.get(p, NUM_MERGES))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = tuple(parts)
        return self._cache[word]

    def text_ids(self, text: str) -> list[int]:
        """The ids of one caption, without BOT/EOT and without truncation."""
        ids = []
        for word in split_words(self.normalize(text)):
            chars = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
            ids.extend(self._encoder[p] for p in self._bpe(chars))
        return ids

    def encode(self, texts: Sequence[str] | str) -> np.ndarray:
        """list of B strings -> int32 [B, context_length]; a single string -> [context_length]."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        out = np.full((len(batch), self.context_length), self.pad_id, dtype=np.int32)
        for row, text in zip(out, batch):
            ids = [self.bot_id, *self.text_ids(text), self.eot_id][: self.context_length]
            ids[-1] = self.eot_id
            row[: len(ids)] = ids
        return out[0] if single else out

    __call__ = encode

    def decode(self, tokens) -> list[str] | str:
        """int [B, L] -> list of B strings ([L] -> one string): the text between BOT and EOT,
        words separated by single spaces."""
        arr = np.asarray(tokens)
        rows = arr[None] if arr.ndim == 1 else arr
        texts = []
        for row in rows.tolist():
            if self.eot_id in row:
                row = row[: row.index(self.eot_id)]
            pieces = [self._decoder[t] for t in row if t != self.bot_id and 0 <= t < self.eot_id]
            # '</w>' is printable, so it survives the byte mapping and marks word ends.
            data = bytes(self._char_bytes[c] for c in "".join(pieces))
            texts.append(data.decode("utf-8", errors="replace").replace("</w>", " ").strip())
        return texts[0] if arr.ndim == 1 else texts
