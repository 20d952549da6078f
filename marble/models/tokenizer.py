"""Tokenizers: CLIP's byte-level BPE (Radford et al. 2021) and BERT's WordPiece (for MiniLM).

CLIP's vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz`, shipped in `marble/assets/` (taken once
from the open_clip_torch wheel; no run-time dependency). Text cleanup follows transformers'
`CLIPTokenizer` (the tokenizers-backed one, which is what runs when ftfy is absent): NFC, whitespace
runs to one space, per-character lower case; no ftfy and no HTML unescaping.

Every tokenizer here returns ids with its special tokens around them and never truncates;
`fit` truncates and pads to an encoder's fixed length.
"""
from __future__ import annotations

import gzip
import json
import unicodedata
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_N_MERGES = 49152 - 256 - 2     # vocab 49408 = 256 bytes + 256 bytes+</w> + merges + 2 specials
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# The Unicode White_Space property, which `\s` means in the Oniguruma/`regex` patterns CLIP's
# tokenizers use (Python's str.isspace also counts U+001C..U+001F, which they do not).
WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                       "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards. Its value order is the order of CLIP's first 256 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clip_normalize(text: str) -> str:
    """NFC, every whitespace run to one space, lower case character by character (no final-sigma
    context, as the tokenizers library's Lowercase)."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for c in text:
        if c in WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(c.lower())
            in_space = False
    return "".join(out)


def _kind(c: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'P' anything else (punctuation, symbols, emoji)."""
    if c in WHITESPACE:
        return "s"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def clip_pre_tokenize(text: str) -> list[str]:
    """CLIP's split of normalized text into words, i.e. the matches of
    `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`, written as a scanner."""
    words, i, n = [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == "s":
            i += 1
            continue
        if text[i] == "'":
            hit = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
            if hit:
                words.append(hit)
                i += len(hit)
                continue
        j = i + 1
        if kind != "N":   # letters and "other" come in runs, numbers one digit at a time
            while j < n and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def bpe(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Byte-pair encoding (Sennrich et al. 2016): repeatedly merge the adjacent pair that was learned
    first, every occurrence left to right, until no learned pair remains."""
    word = list(symbols)
    while len(word) > 1:
        pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return tuple(word)


@lru_cache(maxsize=4)
def read_clip_merges(path: str | None = None) -> tuple[tuple[str, str], ...]:
    """The first CLIP_N_MERGES merges of OpenAI's vocab file (line 0 is a header)."""
    source = Path(path) if path else files("marble") / "assets" / CLIP_VOCAB_FILE
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return tuple(tuple(line.split()) for line in lines[1:CLIP_N_MERGES + 1] if line.strip())


def clip_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Token -> id: the 256 byte characters, the same with </w>, one token per merge, then BOS, EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}


class CLIPTokenizer:
    """CLIP's byte-level BPE with `</w>` marking the end of each word; bos 49406, eos 49407.

    `pad_id` is not used here (see `fit`) but belongs to the tokenizer's identity: SD1's tokenizer pads
    with eos (49407), SD2's OpenCLIP tokenizer with 0 ("!").
    """

    def __init__(self, merges: tuple[tuple[str, str], ...], pad_id: int | None = None):
        self.vocab = clip_vocab(merges)
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_char = bytes_to_unicode()
        self.bos_id, self.eos_id = self.vocab[CLIP_BOS], self.vocab[CLIP_EOS]
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self._word_ids = lru_cache(maxsize=1 << 16)(self._encode_word)

    @classmethod
    def from_file(cls, path: str | None = None, pad_id: int | None = None) -> "CLIPTokenizer":
        """From a bpe_simple_vocab gz file, the copy shipped with marble by default; pad defaults to eos."""
        return cls(read_clip_merges(path), pad_id)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        chars = [self.byte_char[b] for b in word.encode("utf-8")]
        chars[-1] += END_OF_WORD
        return tuple(self.vocab[t] for t in bpe(tuple(chars), self.ranks))

    def encode(self, text: str) -> list[int]:
        """[bos, ...text ids..., eos], untruncated. The special tokens typed literally in the text
        become their ids (as transformers' added-token matching, which is case-sensitive)."""
        ids = [self.bos_id]
        for piece, special in split_specials(text, (CLIP_BOS, CLIP_EOS)):
            if special:
                ids.append(self.vocab[piece])
            else:
                for word in clip_pre_tokenize(clip_normalize(piece)):
                    ids.extend(self._word_ids(word))
        ids.append(self.eos_id)
        return ids


def split_specials(text: str, specials: tuple[str, ...]) -> list[tuple[str, bool]]:
    """Cut `text` at literal occurrences of the special strings: [(piece, is_special), ...]."""
    out, i = [], 0
    while True:
        hits = [(text.find(s, i), s) for s in specials]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            out.append((text[i:], False))
            return out
        at, s = min(hits)
        out += [(text[i:at], False), (s, True)]
        i = at + len(s)


@lru_cache(maxsize=4)
def clip_tokenizer(pad_id: int) -> CLIPTokenizer:
    """The shipped CLIP tokenizer, shared between encoders (it holds no mutable state)."""
    return CLIPTokenizer.from_file(pad_id=pad_id)


class WordPieceTokenizer:
    """BERT's WordPiece (Wu et al. 2016) from a `vocab.txt`, built with the tokenizers library:
    BERT normalizer (clean text, CJK characters split, lower case as the model's config says),
    BERT pre-tokenizer, greedy longest-match-first word pieces with `##` continuations,
    [CLS] ... [SEP] around the text."""

    def __init__(self, vocab_file: Path, lowercase: bool, pad_token: str = "[PAD]", unk_token: str = "[UNK]",
                 cls_token: str = "[CLS]", sep_token: str = "[SEP]"):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

        with open(vocab_file, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f) if line.rstrip("\n")}
        tok = Tokenizer(models.WordPiece(vocab, unk_token=unk_token, max_input_chars_per_word=100))
        # strip_accents=None: accents are stripped exactly when lower-casing (BERT's uncased recipe)
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.add_special_tokens([pad_token, unk_token, cls_token, sep_token])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_token} $A {sep_token}", special_tokens=[(cls_token, vocab[cls_token]),
                                                                   (sep_token, vocab[sep_token])])
        self.tokenizer = tok
        self.vocab_size = len(vocab)
        self.pad_id = vocab[pad_token]

    @classmethod
    def from_folder(cls, folder: Path) -> "WordPieceTokenizer":
        """From a Hugging Face model folder: vocab.txt, and do_lower_case from tokenizer_config.json."""
        folder = Path(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        return cls(folder / "vocab.txt", lowercase=bool(config.get("do_lower_case", True)),
                   **{k: config[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token") if k in config})

    def encode(self, text: str) -> list[int]:
        """[CLS] ...text ids... [SEP], untruncated."""
        return self.tokenizer.encode(text).ids


def fit(ids: list[int], length: int, pad_id: int) -> list[int]:
    """Truncate to `length` keeping the closing special token (as transformers' truncation does:
    bos + the first length-2 text tokens + eos), then pad to `length`."""
    if len(ids) > length:
        ids = ids[:length - 1] + ids[-1:]
    return ids + [pad_id] * (length - len(ids))
