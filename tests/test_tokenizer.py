"""
Tests for tokenizer.py: the byte tokenizer, GPT-2's error when its files cannot be fetched, and
Hugging Face tokenizer folders built as tiktoken encodings.

Each Hugging Face case writes a tiny byte-level BPE to a folder: the 256 byte symbols in GPT-2's
order as ids 0..255, then merges learned by the small BPE trainer below on a corpus with accents,
CJK, emoji, digits and indentation, then <|endoftext|>. Ids are checked against a reference
encoder written here from the Hugging Face algorithm (pre-tokenize, map bytes to GPT-2's
characters, apply the earliest listed merge until none applies), and against the `tokenizers`
package itself when it is installed. CPU only, a few seconds.

    python -m pytest -q tests/test_tokenizer.py
"""

import hashlib
import json
import os
import random
import tempfile
import unicodedata
from collections import Counter

import pytest
import regex
import tiktoken

from tokenizer import (DIGITS_GPT2_PATTERN, byte_tokenizer, gpt2_tokenizer, hf_tokenizer,
                       load_tokenizer)

EOT = "<|endoftext|>"


# -----------------------------------------------------------------------------
# the reference: GPT-2's byte alphabet, pre-tokenizers and BPE, written from their descriptions

def gpt2_byte_alphabet():
    """GPT-2's bytes_to_unicode as (byte, character) pairs in its order: first the bytes whose
    Latin-1 character is visible ('!'..'~', '¡'..'¬', '®'..'ÿ') as themselves, then the other 68
    bytes in increasing order as U+0100, U+0101, ..."""
    visible = [b for b in range(256) if 0x21 <= b <= 0x7E or (0xA1 <= b <= 0xFF and b != 0xAD)]
    hidden = [b for b in range(256) if b not in visible]
    return [(b, chr(b)) for b in visible] + [(b, chr(0x100 + n)) for n, b in enumerate(hidden)]


B2U = dict(gpt2_byte_alphabet())
BYTE_SYMBOLS = [c for _, c in gpt2_byte_alphabet()]  # ids 0..255 in GPT-2's vocab order


def test_reference_byte_alphabet_matches_gpt2():
    # Facts about GPT-2's vocabulary: " " is 'Ġ' (id 220), "\n" is 'Ċ' (id 198), "!" is id 0.
    assert (B2U[0x20], B2U[0x0A], B2U[0x09], B2U[ord("a")], B2U[0xAD]) == ("Ġ", "Ċ", "ĉ", "a", "Ń")
    assert (BYTE_SYMBOLS.index("Ġ"), BYTE_SYMBOLS.index("Ċ"), BYTE_SYMBOLS.index("!")) == (220, 198, 0)
    assert len(set(BYTE_SYMBOLS)) == 256


# Hugging Face's ByteLevel regex as its source spells it (tokenizer.py uses tiktoken's spelling).
HF_BYTELEVEL = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def isolated_split(pattern):
    """Hugging Face's Split(pattern, behavior Isolated): each match is a piece, and so is each
    stretch of text between matches."""
    def split(text):
        pieces, at = [], 0
        for m in regex.finditer(pattern, text):
            if m.start() > at:
                pieces.append(text[at:m.start()])
            if m.end() > m.start():
                pieces.append(m.group())
            at = m.end()
        return pieces + ([text[at:]] if at < len(text) else [])
    return split


split_bytelevel = isolated_split(HF_BYTELEVEL)


def split_digits_then_bytelevel(text):
    """SmolLM2's Sequence[Digits(individual_digits), ByteLevel]: really in two steps. Digits cuts
    out every numeric character, then ByteLevel's regex splits each stretch between them."""
    pieces = []
    for chunk in regex.split(r"(\p{N})", text):
        if regex.fullmatch(r"\p{N}", chunk):
            pieces.append(chunk)
        elif chunk:
            pieces.extend(split_bytelevel(chunk))
    return pieces


def reference_encode(text, vocab, merges, split, ignore_merges=False, nfc=False):
    """Hugging Face's byte-level BPE: pre-tokenize, write each piece's bytes as GPT-2 characters,
    drop characters with no token (no unk token), then merge the adjacent pair listed earliest
    in `merges` (leftmost on a tie) until no listed pair is left. With ignore_merges a piece that
    is itself a token is taken whole."""
    if nfc:
        text = unicodedata.normalize("NFC", text)
    priority = {}
    for i, (a, b) in enumerate(merges):
        priority.setdefault((a, b), i)
    ids = []
    for piece in split(text):
        symbols = [B2U[b] for b in piece.encode("utf-8")]
        if ignore_merges and "".join(symbols) in vocab:
            ids.append(vocab["".join(symbols)])
            continue
        symbols = [s for s in symbols if s in vocab]
        while True:
            pairs = [(priority[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in priority]
            if not pairs:
                break
            _, i = min(pairs)
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids.extend(vocab[s] for s in symbols)
    return ids


def train_bpe(texts, n_merges, split):
    """A tiny BPE trainer: count the pre-tokenized pieces, then repeatedly merge the most frequent
    adjacent pair everywhere (ties broken by the pair itself, so the result is deterministic)."""
    words = Counter(tuple(B2U[b] for b in piece.encode("utf-8")) for t in texts for piece in split(t))
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


CORPUS = [
    "the cat sat on the mat. the dog ate the hat! it's the end, isn't it?",
    "année 2024 : le café était très bon ; über schön, schöne Grüße. été, café, thé.",
    "漢字 漢字 漢字と仮名。 漢字 🙂🙂 🙂 emoji 🙂",
    "def f(x):\n    return x + 12\n\n    y  = 1234 + 2024\n\tz = 12\n",
    "12 12 1234 2024 2024 99 100 +1 -12",
] * 3
MERGES = train_bpe(CORPUS, 60, split_bytelevel)
VOCAB = {s: i for i, s in enumerate(BYTE_SYMBOLS)}
VOCAB.update({a + b: 256 + i for i, (a, b) in enumerate(MERGES)})
EOT_ID = 256 + len(MERGES)


def test_trained_merges_cover_the_interesting_cases():
    made = {a + b for a, b in MERGES}
    assert "Ġthe" in made                                    # space-prefixed word
    assert "12" in made and "ĠĠ" in made                      # digits; indentation
    assert B2U[0xC3] + B2U[0xA9] in made                      # é, two UTF-8 bytes
    assert "".join(B2U[b] for b in "漢".encode()) in made     # a CJK character, three bytes
    assert len(MERGES) == 60 and len(VOCAB) == 316


TEXTS = [
    "the cat sat on the mat.",
    "Hello  world,   double  spaces and trailing   ",
    "  leading spaces",
    "digits: 12 1234 2024, 3.14159, -12, +1, 1,000,000",
    "a  12", "x +1", "  3 4\n5", "a 1b 2 c", "5's",
    "punctuation!!! ??? ... (parens) [brackets] {braces} \"quotes\" 'single'",
    "newlines\n\nand\ttabs\t\there\r\nwindows\r\n",
    "def f(x):\n    return x + 12\n\n\n    y = 1\n",
    "it's don't we'll they've I'M HE'S",
    "année été café über schön Grüße naïve",
    "漢字と仮名、漢字。",
    "emoji 🙂🙂 👍🏽 🇺🇸",
    "nbsp\u00a0here, ideographic\u3000space, line\u2028sep, nel\u0085x",
    "Arabic digits ٣٤ and superscript ² and roman Ⅻ",
    "",
    " ",
    "\n",
]


# -----------------------------------------------------------------------------
# writing tokenizer folders

BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    # GPT-2: ByteLevel splits with its own regex
    "gpt2": BYTELEVEL,
    # Llama-3 / Qwen2: an explicit Split, then ByteLevel only maps bytes
    "llama3": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated", "invert": False},
        dict(BYTELEVEL, use_regex=False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2}, "behavior": "Isolated", "invert": False},
        dict(BYTELEVEL, trim_offsets=False, use_regex=False)]},
    # SmolLM2: digits cut out first
    "smollm2": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, BYTELEVEL]},
}
SPLITS = {"gpt2": split_bytelevel, "llama3": isolated_split(LLAMA3), "qwen2": isolated_split(QWEN2),
          "smollm2": split_digits_then_bytelevel}


def tokenizer_json(pre_tokenizer="gpt2", *, vocab=VOCAB, merges=MERGES, added=((EOT, EOT_ID),),
                   normalizer=None, post_processor=None, pairs=False, ignore_merges=False, **model):
    """A tokenizer.json as the `tokenizers` package writes it."""
    if isinstance(pre_tokenizer, str):
        pre_tokenizer = PRE_TOKENIZERS[pre_tokenizer]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in added],
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": dict(vocab, **{c: i for c, i in added}),
                  "merges": [list(m) if pairs else " ".join(m) for m in merges], **model},
    }


def write_folder(folder, **files):
    """Writes files into folder: keyword name -> content, with "__" standing for "." in the
    name (tokenizer__json=...); content is a JSON-able object, or a str written as is."""
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(folder, name.replace("__", ".")), "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    return str(folder)


def make_folder(tmp_path, name="tiny", config=None, **kwargs):
    return write_folder(tmp_path / name, tokenizer__json=tokenizer_json(**kwargs),
                        tokenizer_config__json=config if config is not None else {"eos_token": EOT})


def llama3_style_merges(vocab):
    """Like Hugging Face's converter of tiktoken files (Llama-3): every split of every token into
    two tokens is a merge, ordered by the id of the token they make."""
    merges = []
    for token, id in sorted(vocab.items(), key=lambda kv: kv[1]):
        splits = [(token[:k], token[k:]) for k in range(1, len(token))
                  if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    return merges


# -----------------------------------------------------------------------------
# the byte tokenizer

def test_byte_tokenizer_ids_are_the_utf8_bytes():
    tok = byte_tokenizer()
    assert (tok.name, tok.n_vocab, tok.eos_id, tok.bos_id, tok.pad_id) == ("bytes", 257, 256, None, 256)
    assert tok.spec == {"kind": "bytes"}
    for text in TEXTS + ["Grüße 漢字 🙂 \x00\x7f\ufffd"]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_byte_tokenizer_encodes_special_token_strings_as_plain_bytes():
    tok = byte_tokenizer()
    assert tok.encode("a" + EOT) == [97] + list(EOT.encode())
    assert 256 not in tok.encode(EOT)
    assert tok.decode([104, 105, 256]) == "hi" + EOT
    assert tok.token_text(256) == EOT and tok.token_text(104) == "h"


def test_decode_replaces_a_cut_character_and_rejects_unknown_ids():
    tok = byte_tokenizer()
    assert tok.decode([0xC3]) == "\ufffd"                       # first byte of é alone
    assert tok.decode([104, 0xE6, 0xBC]) == "h\ufffd"            # a cut 漢: one replacement
    for bad in (257, 10**12, -1):
        with pytest.raises(ValueError, match="not a token"):
            tok.decode([1, bad])
        with pytest.raises(ValueError, match="not a token"):
            tok.token_text(bad)


# -----------------------------------------------------------------------------
# GPT-2 via tiktoken

def test_gpt2_offline_error_explains_the_cache(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError, match="TIKTOKEN_CACHE_DIR") as e:
        gpt2_tokenizer()
    assert "tokenizer.json" in str(e.value) and "no network" in str(e.value)
    with pytest.raises(ValueError, match="TIKTOKEN_CACHE_DIR"):
        load_tokenizer({"kind": "gpt2"})


def _gpt2_files_cached():
    cache = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
             or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    urls = [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}"
            for f in ("vocab.bpe", "encoder.json")]
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


@pytest.mark.skipif(not _gpt2_files_cached(), reason="GPT-2's BPE files are not in tiktoken's cache")
def test_gpt2_tokenizer_when_cached():
    tok = gpt2_tokenizer()
    assert (tok.n_vocab, tok.eos_id, tok.pad_id, tok.bos_id) == (50257, 50256, 50256, None)
    assert tok.encode("hello world") == [31373, 995]  # GPT-2's ids
    assert tok.encode(EOT) != [50256]


# -----------------------------------------------------------------------------
# Hugging Face folders: ids against the reference (and the `tokenizers` package)

VARIANTS = {
    # name: (pre-tokenizer, tokenizer_json options, reference options)
    "gpt2": ("gpt2", {}, {}),
    "gpt2-pairs": ("gpt2", {"pairs": True}, {}),
    "llama3": ("llama3", {"pairs": True, "ignore_merges": True}, {"ignore_merges": True}),
    "qwen2": ("qwen2", {"normalizer": {"type": "NFC"}}, {"nfc": True}),
    "smollm2": ("smollm2", {}, {}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_tokenizer_matches_reference(tmp_path, variant):
    pre, options, ref = VARIANTS[variant]
    tok = hf_tokenizer(make_folder(tmp_path, pre_tokenizer=pre, **options))
    assert (tok.n_vocab, tok.eos_id, tok.pad_id, tok.bos_id, tok.name) == (EOT_ID + 1, EOT_ID, EOT_ID, None, "tiny")
    for text in TEXTS:
        want = reference_encode(text, VOCAB, MERGES, SPLITS[pre], **ref)
        assert tok.encode(text) == want, text
        assert tok.decode(want) == (unicodedata.normalize("NFC", text) if ref.get("nfc") else text)
    # the merges really matter on this text: fewer tokens than bytes
    assert len(tok.encode(" the café 漢字 12")) < len(" the café 漢字 12".encode())


def test_llama3_style_merge_list_with_every_split(tmp_path):
    """Llama-3's tokenizer.json lists several merges per token (all its splits), making equal ids
    in a row; with ignore_merges. Our tiktoken ranks must give the same ids as that merge list."""
    merges = llama3_style_merges({s: i for s, i in VOCAB.items()})
    assert len(merges) > len(MERGES)
    tok = hf_tokenizer(make_folder(tmp_path, pre_tokenizer="llama3", merges=merges, pairs=True,
                                   ignore_merges=True))
    for text in TEXTS:
        assert tok.encode(text) == reference_encode(text, VOCAB, merges, SPLITS["llama3"],
                                                    ignore_merges=True), text
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(os.path.join(tmp_path, "tiny", "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text) == theirs.encode(text).ids, text


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_tokenizer_matches_the_tokenizers_package(tmp_path, variant):
    tokenizers = pytest.importorskip("tokenizers")
    pre, options, _ = VARIANTS[variant]
    folder = make_folder(tmp_path, pre_tokenizer=pre, **options)
    ours, theirs = hf_tokenizer(folder), tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    rng = random.Random(0)
    alphabet = list("ab the12 3\n\t'sé漢🙂+.,") + ["  ", "\u00a0", "٣", "\r\n"]
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))) for _ in range(300)]
    for text in texts:  # (none holds <|endoftext|>, which `tokenizers` would match as a token)
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, repr(text)


def test_vocab_json_and_merges_txt(tmp_path):
    """GPT-2's original file pair: <|endoftext|> is the last vocab.json entry and no merge makes it."""
    vocab = dict(VOCAB, **{EOT: EOT_ID})
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    folder = write_folder(tmp_path / "gpt2ish", vocab__json=vocab, merges__txt=merges_txt,
                          tokenizer_config__json={"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024})
    tok = hf_tokenizer(folder)
    assert (tok.n_vocab, tok.eos_id, tok.pad_id) == (EOT_ID + 1, EOT_ID, EOT_ID)
    for text in TEXTS + ["text with " + EOT + " inside"]:
        assert tok.encode(text) == reference_encode(text, VOCAB, MERGES, split_bytelevel), text
    assert tok.token_text(EOT_ID) == EOT
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))
    theirs.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in TEXTS:
        assert tok.encode(text) == theirs.encode(text).ids, text


def test_special_token_strings_are_plain_text(tmp_path):
    tok = hf_tokenizer(make_folder(tmp_path))
    text = "end" + EOT + "next"
    ids = tok.encode(text)
    assert EOT_ID not in ids and ids == reference_encode(text, VOCAB, MERGES, split_bytelevel)
    assert tok.decode(ids + [EOT_ID]) == text + EOT
    assert tok.token_text(EOT_ID) == EOT and tok.token_text(VOCAB["Ġthe"]) == " the"


def test_nfc_normalizer(tmp_path):
    composed, decomposed = "café été", unicodedata.normalize("NFD", "café été")
    assert composed != decomposed
    qwen = hf_tokenizer(make_folder(tmp_path, "qwen", pre_tokenizer="qwen2", normalizer={"type": "NFC"}))
    assert qwen.encode(decomposed) == qwen.encode(composed)
    assert qwen.encode(decomposed) == reference_encode(composed, VOCAB, MERGES, SPLITS["qwen2"])
    plain = hf_tokenizer(make_folder(tmp_path, "plain", pre_tokenizer="qwen2"))
    assert plain.encode(decomposed) != plain.encode(composed)  # no normalizer: bytes as given


# -----------------------------------------------------------------------------
# SmolLM2's one-regex form of "digits first, then GPT-2's regex"

def test_digits_pattern_splits_like_digits_then_bytelevel():
    hand = {"a  12": ["a", "  ", "1", "2"],
            "x +1": ["x", " +", "1"],
            "  3 4\n5": ["  ", "3", " ", "4", "\n", "5"],
            "a 1b": ["a", " ", "1", "b"],
            "5's  x": ["5", "'s", " ", " x"]}
    for text, pieces in hand.items():
        assert split_digits_then_bytelevel(text) == pieces, text
        assert regex.findall(DIGITS_GPT2_PATTERN, text) == pieces, text
    rng = random.Random(1)
    alphabet = list("ab 1 2\n\t'+s.") + ["  ", "\u00a0", "٣", "Ⅻ", "²", "é", "\r\n", "漢"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        assert regex.findall(DIGITS_GPT2_PATTERN, text) == split_digits_then_bytelevel(text), repr(text)


def test_digits_pattern_in_tiktoken_matches_reference_ids(tmp_path):
    """The same check through tiktoken's own regex engine, seen in the ids: whitespace merges
    ('ĠĠ', ...) make the ids depend on where the whitespace pieces end."""
    tok = hf_tokenizer(make_folder(tmp_path, pre_tokenizer="smollm2"))
    rng = random.Random(2)
    alphabet = list("ab 1 2\n\t'+s.") + ["  ", "    ", "\u00a0", "٣", "é", "\r\n", "the"]
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        assert tok.encode(text) == reference_encode(text, VOCAB, MERGES, split_digits_then_bytelevel), repr(text)


def test_split_regex_keeps_text_between_matches(tmp_path):
    """A Split regex that does not match every character: Hugging Face keeps the gaps as pieces."""
    letters = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Isolated", "invert": False},
        dict(BYTELEVEL, use_regex=False)]}
    tok = hf_tokenizer(make_folder(tmp_path, pre_tokenizer=letters))
    for text in TEXTS:
        assert tok.encode(text) == reference_encode(text, VOCAB, MERGES, isolated_split(r"\p{L}+")), text
        assert tok.decode(tok.encode(text)) == text
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(os.path.join(tmp_path, "tiny", "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text) == theirs.encode(text).ids, text


# -----------------------------------------------------------------------------
# special tokens: EOS, BOS, PAD, holes

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA_ADDED = ((BOS, 400), (EOS, 401), ("<|eot_id|>", 409))  # ids 316..399 and 402..408 are holes


def llama_post_processor(bos=BOS):
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [], "special_tokens": {bos: {"id": bos, "ids": [400], "tokens": [bos]}}}
    return {"type": "Sequence", "processors": [dict(BYTELEVEL, add_prefix_space=True, trim_offsets=False),
                                               template]}


def test_llama3_style_bos_eos_and_holes(tmp_path):
    folder = make_folder(tmp_path, pre_tokenizer="llama3", added=LLAMA_ADDED, pairs=True, ignore_merges=True,
                         post_processor=llama_post_processor(),
                         config={"bos_token": BOS, "eos_token": {"content": EOS, "special": True}})
    tok = hf_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_vocab) == (400, 401, 401, 410)
    assert tok.encode("the end") == reference_encode("the end", VOCAB, MERGES, SPLITS["llama3"], ignore_merges=True)
    assert BOS not in tok.decode(tok.encode("the end"))  # encode never adds BOS itself
    assert tok.token_text(409) == "<|eot_id|>"
    with pytest.raises(ValueError, match="not a token"):
        tok.decode([350])  # a hole in the ids
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    assert theirs.encode("the end").ids == [400] + tok.encode("the end")


def test_bos_from_a_plain_template_or_add_bos_token(tmp_path):
    template = llama_post_processor()["processors"][1]
    tok = hf_tokenizer(make_folder(tmp_path, "a", added=LLAMA_ADDED, post_processor=template,
                                   config={"eos_token": EOS}))
    assert (tok.bos_id, tok.eos_id) == (400, 401)
    tok = hf_tokenizer(make_folder(tmp_path, "b", added=LLAMA_ADDED,
                                   config={"add_bos_token": True, "bos_token": BOS, "eos_token": EOS}))
    assert tok.bos_id == 400
    # GPT-2 / Qwen style: a ByteLevel post-processor only, add_bos_token false -> no BOS
    tok = hf_tokenizer(make_folder(tmp_path, "c", post_processor=dict(BYTELEVEL, trim_offsets=False),
                                   config={"add_bos_token": False, "bos_token": None, "eos_token": EOT}))
    assert tok.bos_id is None


def test_eos_and_pad_sources(tmp_path):
    added = ((EOT, EOT_ID), ("<|im_end|>", EOT_ID + 1), ("<pad>", EOT_ID + 2))
    # tokenizer_config.json first
    config = {"eos_token": "<|im_end|>", "pad_token": "<pad>"}
    tok = hf_tokenizer(make_folder(tmp_path, "a", added=added, config=config))
    assert (tok.eos_id, tok.pad_id) == (EOT_ID + 1, EOT_ID + 2)
    # then special_tokens_map.json
    folder = make_folder(tmp_path, "b", added=added, config={})
    write_folder(folder, special_tokens_map__json={"eos_token": {"content": "<|im_end|>", "lstrip": False}})
    tok = hf_tokenizer(folder)
    assert (tok.eos_id, tok.pad_id) == (EOT_ID + 1, EOT_ID + 1)
    # then <|endoftext|>
    assert hf_tokenizer(make_folder(tmp_path, "c", added=added, config={"eos_token": None})).eos_id == EOT_ID
    # none of them: an error
    with pytest.raises(ValueError, match="no EOS"):
        hf_tokenizer(make_folder(tmp_path, "d", added=(("<s>", EOT_ID),), config={}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        hf_tokenizer(make_folder(tmp_path, "e", config={"eos_token": "</s>"}))


def test_bytes_without_a_token_are_dropped_like_hugging_face(tmp_path):
    """A trained vocabulary may lack bytes never seen in training; Hugging Face's BPE (no unk
    token) drops them. tiktoken alone would panic."""
    missing = {B2U[b] for b in (0x04, 0x1D, 0xF1, 0xC5, 0x9D)}  # 0xC5 0x9D: 'ŝ'
    assert not any(a[0] in missing or b[-1] in missing for a, b in MERGES)
    vocab = {s: i for s, i in VOCAB.items() if s not in missing}
    folder = make_folder(tmp_path, vocab=vocab)
    tok = hf_tokenizer(folder)
    texts = ["ab\x04cd", "!\x04!", "a\x1d the", "x\U00050000y 漢字", "\x04", "t\u015dhe", " t\u015dhe"] + TEXTS[:5]
    for text in texts:
        assert tok.encode(text) == reference_encode(text, vocab, MERGES, split_bytelevel), repr(text)
    # the neighbours of a dropped character merge as if it were not there
    assert tok.encode(" t\u015dhe") == tok.encode(" the") == [VOCAB["Ġthe"]]
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for text in texts:
        assert tok.encode(text) == theirs.encode(text).ids, repr(text)


def test_a_token_no_merge_makes(tmp_path):
    """A multi-byte vocab entry that no merge produces: Hugging Face's merge loop never emits it,
    except with ignore_merges when a whole piece equals it. Either way it stays decodable."""
    vocab = dict(VOCAB, **{"Ġzq": 500})
    for ignore_merges in (False, True):
        folder = make_folder(tmp_path, f"ignore_{ignore_merges}", vocab=vocab, ignore_merges=ignore_merges)
        tok = hf_tokenizer(folder)
        for text in (" zq", "a zq b", " zqzq"):
            want = reference_encode(text, vocab, MERGES, split_bytelevel, ignore_merges=ignore_merges)
            assert tok.encode(text) == want, text
        assert (500 in tok.encode(" zq")) == ignore_merges
        assert tok.token_text(500) == " zq" and tok.decode([500]) == " zq"
        tokenizers = pytest.importorskip("tokenizers")
        theirs = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        assert tok.encode("a zq b") == theirs.encode("a zq b").ids


# -----------------------------------------------------------------------------
# load_tokenizer(spec)

def test_load_tokenizer_rebuilds_from_spec(tmp_path, monkeypatch):
    make_folder(tmp_path, "smol", pre_tokenizer="smollm2")
    monkeypatch.chdir(tmp_path)
    tok = hf_tokenizer("smol")  # a relative path: the spec must still work from elsewhere
    assert tok.spec == {"kind": "hf", "folder": str(tmp_path / "smol")}
    monkeypatch.chdir("/")
    again = load_tokenizer(json.loads(json.dumps(tok.spec)))  # what a checkpoint would store
    text = "x  = 1234 + café 漢字 🙂\n    return"
    assert again.encode(text) == reference_encode(text, VOCAB, MERGES, split_digits_then_bytelevel)
    assert (again.n_vocab, again.eos_id, again.name) == (tok.n_vocab, tok.eos_id, "smol")
    assert load_tokenizer({"kind": "bytes"}).encode("hé") == [104, 0xC3, 0xA9]


def test_load_tokenizer_rejects_bad_specs():
    for spec in ({"kind": "sentencepiece"}, "bytes", {"folder": "x"}, {"kind": "hf"}):
        with pytest.raises(ValueError):
            load_tokenizer(spec)


# -----------------------------------------------------------------------------
# what is refused, with a clear error

def test_sentencepiece_tokenizers_are_out_of_scope(tmp_path):
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    cases = {
        "metaspace": dict(pre_tokenizer=metaspace),
        "byte_fallback": dict(byte_fallback=True),
    }
    for name, kwargs in cases.items():
        with pytest.raises(ValueError, match="out of scope") as e:
            hf_tokenizer(make_folder(tmp_path, name, **kwargs))
        assert "Llama-3" in str(e.value)  # names what is supported
    only_model = write_folder(tmp_path / "tinyllama", tokenizer__model="not really protobuf")
    with pytest.raises(ValueError, match="out of scope"):
        hf_tokenizer(only_model)


def test_merges_out_of_rank_order_are_refused(tmp_path):
    a, b = MERGES[3], MERGES[10]
    vocab = dict(VOCAB, **{a[0] + a[1]: VOCAB[b[0] + b[1]], b[0] + b[1]: VOCAB[a[0] + a[1]]})
    with pytest.raises(ValueError, match="cannot be expressed as a tiktoken encoding"):
        hf_tokenizer(make_folder(tmp_path, vocab=vocab))
    with pytest.raises(ValueError, match="not an ordinary vocabulary token"):
        hf_tokenizer(make_folder(tmp_path, "unknown", merges=MERGES + [("q", "z")]))


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        hf_tokenizer(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="tokenizer.json") as e:
        hf_tokenizer(empty)
    assert str(empty) in str(e.value) and "vocab.json" in str(e.value)
    bad = write_folder(tmp_path / "bad", tokenizer__json='{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: bad JSON"):
        hf_tokenizer(bad)
    bad_config = make_folder(tmp_path, "bad_config")
    write_folder(bad_config, tokenizer_config__json="{eos_token: 1}")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: bad JSON"):
        hf_tokenizer(bad_config)
    only_vocab = write_folder(tmp_path / "only_vocab", vocab__json=VOCAB)
    with pytest.raises(ValueError, match="merges.txt"):
        hf_tokenizer(only_vocab)


def test_unsupported_settings_are_named(tmp_path):
    cases = {
        "add_prefix_space": dict(pre_tokenizer=dict(BYTELEVEL, add_prefix_space=True)),
        "Whitespace": dict(pre_tokenizer={"type": "Whitespace"}),
        "Lowercase": dict(normalizer={"type": "Lowercase"}),
        "not BPE": dict(type="WordPiece"),
        "String": dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated", "invert": False},
            dict(BYTELEVEL, use_regex=False)]}),
    }
    for name, kwargs in cases.items():
        with pytest.raises(ValueError, match=name):
            hf_tokenizer(make_folder(tmp_path, name.replace(" ", "_"), **kwargs))
    qwen_slow = write_folder(tmp_path / "qwen_slow", vocab__json=VOCAB, merges__txt="",
                             tokenizer_config__json={"tokenizer_class": "Qwen2Tokenizer"})
    with pytest.raises(ValueError, match="Qwen2Tokenizer"):
        hf_tokenizer(qwen_slow)
    letters = {s: i for s, i in VOCAB.items()}
    letters["▁the"] = 999
    with pytest.raises(ValueError, match="byte alphabet"):
        hf_tokenizer(make_folder(tmp_path, "sp_vocab", vocab=letters))
