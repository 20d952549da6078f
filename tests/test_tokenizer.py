"""Tokenizers: CLIP BPE against transformers' CLIPTokenizer built offline from our shipped vocab file,
golden ids from Stable Diffusion, and WordPiece against the MiniLM package's own tokenizer."""
import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marble.models.tokenizer import (CLIPTokenizer, WordPieceTokenizer, clip_pre_tokenize, clip_tokenizer, fit,
                                     split_specials)
from sd_fixtures import oracle_tokenizer_folder

pytestmark = pytest.mark.unit

PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "  Hello,   WORLD!!  ",
    "A Majestic LION, highly-detailed; 8k (trending on ArtStation) [v2] {x} <y> ~z~ @user #tag $5 % ^ & * _ = +",
    "café naïve résumé Ωmega ΣΟΦΟΣ İstanbul straße ﬁne",
    "東京の夜景 한국어 中文字符 日本語のテキスト",
    "🐱🐶 emoji 👍🏽 👨‍👩‍👧 ❤️ 🇫🇷",
    "1234.5 x2 3rd 1/2 ½ ² ٣",
    "it's they're I'LL we'd you've I'm don't'st '''s",
    "<|endoftext|> <|ENDOFTEXT|> a<|startoftext|>b",
    "tab\tnew\nline\r\n\x1c\u2028x\u3000y\xa0z",
    "e\u0301 (decomposed é) and \u00e9",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "masterpiece, best quality, " * 20,                                          # > 77 tokens
    "a very long prompt about a castle on a hill at sunset with dragons " * 8,   # > 77 tokens
]


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = oracle_tokenizer_folder(tmp_path_factory.mktemp("clip_vocab"))
    return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def ours():
    return clip_tokenizer(49407)


def test_golden_ids_from_stable_diffusion(ours):
    # SD1's tokenizer on "a photo of a cat": bos, a, photo, of, a, cat, eos
    assert ours.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.encode("") == [49406, 49407]
    assert ours.vocab_size == 49408
    assert ours.vocab["!"] == 0 and ours.vocab["!</w>"] == 256 and ours.vocab["a</w>"] == 320


def test_pre_tokenizer_splits_like_clips_regex():
    assert clip_pre_tokenize("it's 12 apples!! (ok)") == ["it", "'s", "1", "2", "apples", "!!", "(", "ok", ")"]
    assert clip_pre_tokenize("x'''s don't") == ["x", "'''", "s", "don", "'t"]
    assert clip_pre_tokenize("naïve🐱🐶,x") == ["naïve", "🐱🐶,", "x"]
    assert split_specials("a<|endoftext|>b", ("<|endoftext|>",)) == [("a", False), ("<|endoftext|>", True),
                                                                      ("b", False)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_clip_ids_equal_transformers(prompt, ours, hf_clip):
    assert ours.encode(prompt) == hf_clip(prompt)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_clip_truncation_and_padding_equal_transformers(prompt, hf_clip):
    # as SD pipelines call it: padding="max_length", max_length=77, truncation=True
    want = hf_clip(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert fit(clip_tokenizer(49407).encode(prompt), 77, 49407) == want
    # SD2 (OpenCLIP) pads with 0 after the eos. (transformers' SD2 tokenizer, pad_token="!", also
    # turns every "!" typed in a prompt into the special token 0, unlike OpenCLIP's, which SD2 was
    # trained with; we follow OpenCLIP, so the oracle here is SD1's ids with the pads set to 0.)
    n = min(len(hf_clip(prompt)["input_ids"]), 77)
    assert fit(clip_tokenizer(0).encode(prompt), 77, 0) == want[:n] + [0] * (77 - n)


def test_long_prompt_keeps_bos_75_tokens_eos(ours):
    ids = ours.encode("masterpiece, best quality, " * 20)
    assert len(ids) == 2 + 20 * 5  # "masterpiece" "," "best" "quality" ","
    cut = fit(ids, 77, 49407)
    assert len(cut) == 77 and cut[:76] == ids[:76] and cut[76] == 49407
    assert fit([49406, 320, 49407], 5, 0) == [49406, 320, 49407, 0, 0]


def assigned_text():
    # characters of Python's Unicode tables only: code points assigned in a later Unicode version
    # than Python's unicodedata knows are classified differently by the tokenizers library's regex
    chars = st.characters(blacklist_categories=("Cn", "Cs"))
    pools = st.sampled_from([" ", "'", "s", "t", "re", "A", "1", "!", "é", "\u0301", "中", "🐱", "\t", "\u3000"])
    return st.lists(st.one_of(chars, pools), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=assigned_text())
def test_clip_ids_equal_transformers_on_random_text(text, ours, hf_clip):
    assert ours.encode(text) == hf_clip(text)["input_ids"]


def test_clip_tokenizer_reads_a_given_vocab_file(tmp_path):
    # the file argument is honoured: a vocab file with only the first 10 merges gives other ids
    from importlib.resources import files
    with (files("marble") / "assets" / "bpe_simple_vocab_16e6.txt.gz").open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress("\n".join(lines[:11]).encode("utf-8")))
    tok = CLIPTokenizer.from_file(str(short))
    assert tok.vocab_size == 256 * 2 + 10 + 2
    # merges: 0 "i n", 1 "t h", 6 "th e</w>". "the" -> the</w> (id 512 + 6); "thin" -> th, i, n</w>
    # (no merge joins "i" with the word-final "n</w>"); byte ids: i = 105 - 33, n</w> = 256 + 110 - 33
    assert tok.bos_id == 512 + 10
    assert tok.encode("the thin") == [tok.bos_id, 518, 513, 72, 333, tok.eos_id]


# WordPiece (MiniLM) ---------------------------------------------------------------------------

WORDPIECE_PROMPTS = PROMPTS + ["two red circles above a blue square", "Ünïcödé ÀÉÎÕÜ", "unaffable [CLS] [SEP] x",
                               "x" * 150, "\x00control\x07chars\u200bzero width"]


@pytest.fixture(scope="module")
def minilm_tokenizers():
    from marble.models.bert import minilm_folder
    tokenizers = pytest.importorskip("tokenizers")
    folder = minilm_folder()
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))  # the package's own
    reference.no_truncation()
    reference.no_padding()
    return WordPieceTokenizer.from_folder(folder), reference


@pytest.mark.parametrize("prompt", WORDPIECE_PROMPTS)
def test_wordpiece_ids_equal_the_packages_tokenizer(prompt, minilm_tokenizers):
    ours, reference = minilm_tokenizers
    assert ours.encode(prompt) == reference.encode(prompt).ids


def test_wordpiece_golden(minilm_tokenizers):
    ours, _ = minilm_tokenizers
    # bert-base-uncased ids: [CLS]=101 a=1037 photo=6302 of=1997 cat=4937 [SEP]=102; lower-cased, accents stripped
    assert ours.encode("A Photo of a CAT") == [101, 1037, 6302, 1997, 1037, 4937, 102]
    assert ours.encode("") == [101, 102]
    assert ours.encode("café") == ours.encode("cafe")
    assert ours.pad_id == 0
