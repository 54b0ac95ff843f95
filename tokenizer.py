"""
Every tokenizer pesc uses, each one a tiktoken.Encoding plus the special tokens training needs.

    byte_tokenizer()       256 byte tokens + <|endoftext|> = 256. Offline, no files, round-trips
                           any text; the default for the small models trained from scratch here.
    gpt2_tokenizer()       GPT-2's BPE from tiktoken (downloaded once, then cached).
    hf_tokenizer(folder)   the byte-level BPE tokenizer of a Hugging Face model folder (GPT-2,
                           SmolLM/SmolLM2, Qwen2/Qwen2.5, Llama-3.x), built from the folder's own
                           tokenizer.json (or vocab.json + merges.txt), so a pretrained model sees
                           text split exactly as in its training.
    load_tokenizer(spec)   rebuilds any of them from `tok.spec`, the plain dict a checkpoint stores.

    python tokenizer.py [bytes | gpt2 | path/to/model_folder] "some text"   # shows the tokens
    python -m pytest -q tests/test_tokenizer.py

Why tiktoken for Hugging Face files: tiktoken's BPE merges the adjacent pair whose concatenation
has the lowest rank; Hugging Face's merges the pair listed earliest in `merges`. When the token
ids (used as ranks) grow with the merge order the two pick the same merges, so hf_tokenizer checks
that and refuses files where it does not hold. tiktoken also merges an adjacent pair that is not
a listed merge when the two concatenate to a token; for vocabularies learned by BPE we know of no
text where this differs (tests/test_tokenizer.py compares against the Hugging Face algorithm and,
when installed, the `tokenizers` package itself). Llama-3's tokenizer is a tiktoken encoding in
Meta's own code (so was Qwen's first release): for it, tiktoken is the original.

Known differences from the `tokenizers` package, on rare characters only: NFC comes from Python's
unicodedata, whose Unicode version may not be that of tokenizers' tables (3 of 20,000 strings of
random code points came out differently, all through combining marks new in Unicode 14); and
Hugging Face splits with the Oniguruma regex engine, tiktoken with Rust's fancy-regex (no
difference found on those 20,000 strings).

What encode() does differently from Hugging Face, on purpose: strings of special or added tokens
inside the text ("<|endoftext|>", Qwen2.5's "<tool_call>") are encoded as plain text, so a
document can never inject a control token; the training code appends EOS itself. And BOS is not
prepended: `bos_id` says whether the training code must do it.

Which token ends a document / a response (the `eos_id` we pick from the folder's files):
  - SmolLM2 base (HuggingFaceTB/SmolLM2-*): <|endoftext|>, id 0. Id 0 is <|endoftext|> in
    SmolLM2's added tokens, and configs derived from HuggingFaceTB/SmolLM2-135M carry bos/eos
    id 0 (as SmolLM v1 base does: github.com/ml-explore/mlx-examples/issues/900); the instruct
    models use <|im_end|> (id 2) instead (their special_tokens_map.json).
  - Qwen2.5 base (Qwen/Qwen2.5-*): <|endoftext|>, id 151643 (eos_token in tokenizer_config.json;
    confirmed by rinna on huggingface.co/rinna/qwen2.5-bakeneko-32b/discussions/1). The instruct
    models use <|im_end|>, 151645. Qwen adds no BOS.
  - Llama-3.2 base (meta-llama/Llama-3.2-*B): <|end_of_text|>, id 128001 (special_tokens_map.json
    in copies of Llama-3.2-1B: bos <|begin_of_text|>, eos <|end_of_text|>); every sequence starts
    with <|begin_of_text|>, 128000, which tokenizer.json's TemplateProcessing post-processor
    prepends. The instruct models end a turn with <|eot_id|>, 128009.
"""

import json
import os
import sys
import unicodedata

import tiktoken

from tensorfile import read_json

EOT = "<|endoftext|>"

# GPT-2's pre-split regex (tiktoken's spelling of the Hugging Face ByteLevel regex
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ ; same matches).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# SmolLM2 (and StarCoder) pre-tokenize in two steps: Digits(individual_digits) cuts every digit
# out as its own piece, then the GPT-2 regex splits each stretch between digits. tiktoken takes one
# regex, so this is the same split in one pass:
#   - ` ?\p{N}+` becomes `\p{N}`: a digit is alone, and never takes the space before it (that
#     space ended the previous stretch);
#   - `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`: a digit ends a stretch like the end of the text
#     does, so whitespace before a digit is taken whole ("a  12" -> "a", "  ", "1", "2"), where
#     GPT-2 would leave its last space to prefix the next word.
# No other alternative can match a digit or look past one, so nothing else changes; the tests
# check this against a reference that really splits the digits first. (Hugging Face's Digits uses
# Rust's char::is_numeric, i.e. \p{N}; the two can disagree only on characters newer than one of
# their Unicode tables.)
DIGITS_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

SUPPORTED = ("byte-level BPE tokenizers: GPT-2, SmolLM/SmolLM2, Qwen2/Qwen2.5, Llama-3.x "
             "(a tokenizer.json, or GPT-2-style vocab.json + merges.txt)")
SENTENCEPIECE = ("SentencePiece tokenizers (Llama-2, TinyLlama, Mistral v0.1, Gemma, ...) are out of "
                 "scope; supported are " + SUPPORTED)


class Tokenizer:
    """A tiktoken.Encoding plus the special tokens the training code needs."""

    def __init__(self, enc, *, name, eos_id, spec, bos_id=None, pad_id=None, nfc=False,
                 pattern=None, ranks=None, missing_bytes=b""):
        self.enc = enc                # the tiktoken.Encoding, e.g. for encode_ordinary_batch
        self.name = name              # "bytes", "gpt2", or the model folder's name
        self.n_vocab = enc.n_vocab    # max id + 1; ids at or above it are never valid
        self.eos_id = eos_id          # ends a document / a response
        self.bos_id = bos_id          # to prepend to every sequence (Llama-3), else None
        self.pad_id = eos_id if pad_id is None else pad_id
        self.spec = spec              # plain data: load_tokenizer(spec) rebuilds this tokenizer
        self._nfc = nfc
        # Only for vocabularies that lack some single-byte tokens (see _encode_dropping)
        self._pattern, self._ranks, self._missing = pattern, ranks, missing_bytes

    def encode(self, text):
        """Token ids of ordinary text: special-token strings in it are encoded as plain text.
        NFC-normalizes first when the folder's tokenizer.json says so (Qwen2)."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._missing:
            data = text.encode("utf-8", errors="replace")
            if len(data.translate(None, self._missing)) != len(data):
                return self._encode_dropping(text)
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """Text of the ids; an incomplete UTF-8 sequence (a cut multi-byte character) becomes U+FFFD."""
        ids = [int(i) for i in ids]
        try:
            return self.enc.decode(ids, errors="replace")
        except (KeyError, OverflowError):
            bad = next(i for i in ids if not self._valid(i))
            raise ValueError(f"tokenizer {self.name}: id {bad} is not a token "
                             f"(n_vocab {self.n_vocab})") from None

    def token_text(self, id):
        """One token as text, for displays (a token that is part of a character shows U+FFFD)."""
        id = int(id)
        if not self._valid(id):
            raise ValueError(f"tokenizer {self.name}: id {id} is not a token (n_vocab {self.n_vocab})")
        return self.enc.decode_single_token_bytes(id).decode("utf-8", errors="replace")

    def _valid(self, id):
        try:
            self.enc.decode_single_token_bytes(id)
            return True
        except (KeyError, OverflowError, ValueError):
            return False

    def _encode_dropping(self, text):
        """encode() for text holding a byte the vocabulary has no token for. tiktoken would crash
        on it (a Rust panic), while Hugging Face's BPE (with no unk token) drops that byte and
        merges its neighbours as if it were not there, so we do the same, piece by piece, with
        tiktoken's own rule: the whole piece if it is a token, else merge the lowest rank first."""
        import regex  # a dependency of tiktoken; only this rare path needs the split in Python
        ids = []
        for piece in regex.findall(self._pattern, text):
            data = piece.encode("utf-8", errors="replace").translate(None, self._missing)
            if data in self._ranks:
                ids.append(self._ranks[data])
                continue
            parts = [data[i:i + 1] for i in range(len(data))]
            while len(parts) > 1:
                pairs = [(self._ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
                pairs = [p for p in pairs if p[0] is not None]
                if not pairs:
                    break
                _, i = min(pairs)
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(self._ranks[p] for p in parts)
        return ids

    def __repr__(self):
        return (f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, eos_id={self.eos_id}, "
                f"bos_id={self.bos_id}, pad_id={self.pad_id})")


# -----------------------------------------------------------------------------
# the byte tokenizer and GPT-2

def byte_tokenizer():
    """One token per UTF-8 byte (id = the byte) plus <|endoftext|> = 256: n_vocab 257.
    The pattern only chunks the text for tiktoken; with single-byte tokens it cannot change ids."""
    enc = tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN,
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={EOT: 256}, explicit_n_vocab=257)
    return Tokenizer(enc, name="bytes", eos_id=256, spec={"kind": "bytes"})


def gpt2_tokenizer():
    """GPT-2's BPE (50257 tokens, <|endoftext|> = 50256). tiktoken downloads its two files the
    first time and caches them, so this needs the network once per machine (or cache dir)."""
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors come in many types; all mean the same here
        raise ValueError(
            f"could not load GPT-2's BPE files ({type(e).__name__}: {e}). tiktoken downloads them "
            "once and caches them in $TIKTOKEN_CACHE_DIR (default: <tmp dir>/data-gym-cache). On a "
            "machine with internet access run `TIKTOKEN_CACHE_DIR=some/dir python -c \"import "
            "tiktoken; tiktoken.get_encoding('gpt2')\"`, copy some/dir here and set "
            "TIKTOKEN_CACHE_DIR to it; or use a model folder with a tokenizer.json (e.g. "
            "openai-community/gpt2) through hf_tokenizer, or the offline byte tokenizer."
        ) from e
    return Tokenizer(enc, name="gpt2", eos_id=enc.eot_token, spec={"kind": "gpt2"})


def load_tokenizer(spec):
    """The tokenizer a `Tokenizer.spec` describes: {"kind": "bytes"}, {"kind": "gpt2"} or
    {"kind": "hf", "folder": path}."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a tokenizer spec is a dict like {{'kind': 'bytes'}}, got {spec!r}")
    kind = spec["kind"]
    if kind == "bytes":
        return byte_tokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "hf":
        if "folder" not in spec:
            raise ValueError(f"tokenizer spec {spec!r} names no folder")
        return hf_tokenizer(spec["folder"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in {spec!r}; valid kinds: bytes, gpt2, hf")


# -----------------------------------------------------------------------------
# Hugging Face model folders

def hf_tokenizer(folder):
    """The byte-level BPE tokenizer of a Hugging Face model folder, as a tiktoken Encoding."""
    folder = os.path.abspath(os.path.expanduser(str(folder)))
    if not os.path.isdir(folder):
        raise ValueError(f"tokenizer folder {folder} does not exist")

    def path(name):
        return os.path.join(folder, name)

    config = read_json(path("tokenizer_config.json")) if os.path.exists(path("tokenizer_config.json")) else {}
    special_map = (read_json(path("special_tokens_map.json"))
                   if os.path.exists(path("special_tokens_map.json")) else {})

    if os.path.exists(path("tokenizer.json")):
        tok = _read_tokenizer_json(path("tokenizer.json"))
    elif os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")):
        tok = _read_vocab_and_merges(folder, config, special_map)
    elif os.path.exists(path("tokenizer.model")):
        raise ValueError(f"{folder} has only a tokenizer.model: {SENTENCEPIECE}")
    else:
        raise ValueError(f"no tokenizer in {folder}: looked for tokenizer.json, vocab.json + "
                         "merges.txt (and tokenizer.model)")

    # Added tokens from tokenizer_config.json too (transformers writes them there as well).
    added = dict(tok["added"])
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content, id = _token_name(entry), int(key)
        if content is not None and added.setdefault(content, id) != id:
            raise ValueError(f"{folder}: added token {content!r} has id {added[content]} in "
                             f"tokenizer.json but {id} in tokenizer_config.json")

    ranks, specials, missing = _ranks_and_specials(tok["vocab"], tok["merges"], added,
                                                   tok["ignore_merges"], folder)
    name = os.path.basename(folder)
    try:
        enc = tiktoken.Encoding(name=name, pat_str=tok["pattern"], mergeable_ranks=ranks,
                                special_tokens=specials)
    except ValueError as e:
        raise ValueError(f"{folder}: tiktoken cannot compile the pre-tokenizer regex "
                         f"{tok['pattern']!r} ({e})") from None

    eos_id, bos_id, pad_id = _special_ids(folder, config, special_map, tok, specials)
    if missing and tok["unk"] is not None:
        # Hugging Face would then emit the unk token for those bytes, not drop them: not handled.
        raise ValueError(f"{folder}: the vocabulary has no token for bytes {list(missing)} and "
                         f"sets unk_token {tok['unk']!r}; this combination is not supported")
    return Tokenizer(enc, name=name, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
                     spec={"kind": "hf", "folder": folder}, nfc=tok["nfc"],
                     pattern=tok["pattern"], ranks=ranks, missing_bytes=missing)


def _special_ids(folder, config, special_map, tok, specials):
    """(eos_id, bos_id or None, pad_id) from tokenizer_config.json, special_tokens_map.json and the
    post-processor's template (see the module docstring for which EOS ends a response)."""
    def token_id(name, what):
        if name in specials:
            return specials[name]
        if name in tok["vocab"]:
            return tok["vocab"][name]
        raise ValueError(f"{folder}: the {what} {name!r} is not in the vocabulary")

    eos = (_token_name(config.get("eos_token")) or _token_name(special_map.get("eos_token"))
           or (EOT if EOT in specials or EOT in tok["vocab"] else None))
    if eos is None:
        raise ValueError(f"{folder}: no EOS token: tokenizer_config.json and special_tokens_map.json "
                         f"name no eos_token, and there is no {EOT}")
    eos_id = token_id(eos, "eos_token")
    bos_id = tok["template_bos"]
    if config.get("add_bos_token") is True:
        bos = _token_name(config.get("bos_token")) or _token_name(special_map.get("bos_token"))
        if bos is None:
            raise ValueError(f"{folder}: tokenizer_config.json sets add_bos_token but names no bos_token")
        bos_id = token_id(bos, "bos_token")
    elif isinstance(bos_id, str):
        bos_id = token_id(bos_id, "BOS token of the post-processor")
    pad = _token_name(config.get("pad_token"))
    return eos_id, bos_id, token_id(pad, "pad_token") if pad else eos_id


def _token_name(entry):
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string, or
    {"content": ...} (an AddedToken), or null."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


def _read_tokenizer_json(path):
    """The parts of a tokenizer.json we use, after checking it is a byte-level BPE we can express."""
    j = read_json(path)
    model = j.get("model") or {}
    pre, norm, dec = j.get("pre_tokenizer"), j.get("normalizer"), j.get("decoder")

    # SentencePiece-style BPE (Llama-2 family): spaces become "▁" and unknown characters fall back
    # to <0xNN> byte tokens. Different algorithm, different alphabet: refuse it by name.
    if (model.get("byte_fallback") or _has(pre, "Metaspace") or _has(dec, "Metaspace")
            or _has(dec, "ByteFallback") or "▁" in json.dumps(norm, ensure_ascii=False)):
        raise ValueError(f"{path} is a SentencePiece-style tokenizer: {SENTENCEPIECE}")
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE; supported are {SUPPORTED}")
    if not (_has(pre, "ByteLevel") or _has(dec, "ByteLevel")):
        raise ValueError(f"{path}: not a byte-level BPE (no ByteLevel pre-tokenizer or decoder); "
                         f"supported are {SUPPORTED}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: BPE with {key} {model[key]!r} is not supported")
    if model.get("dropout"):
        raise ValueError(f"{path}: BPE dropout {model['dropout']} makes encoding random; not supported")

    # BOS: a TemplateProcessing post-processor (alone, or in a Sequence as in Llama-3) whose
    # template for a single text starts with a special token prepends that token to every text.
    template_bos = None
    post = j.get("post_processor") or {}
    for proc in (post.get("processors") or []) if post.get("type") == "Sequence" else [post]:
        if not isinstance(proc, dict) or proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        if single and "SpecialToken" in single[0]:
            first = single[0]["SpecialToken"]["id"]
            ids = ((proc.get("special_tokens") or {}).get(first) or {}).get("ids") or []
            template_bos = ids[0] if len(ids) == 1 else first  # a name is looked up later

    return dict(vocab=model.get("vocab") or {}, merges=model.get("merges") or [],
                added={t["content"]: t["id"] for t in j.get("added_tokens") or []},
                pattern=_pattern(pre, path), nfc=_nfc(norm, path),
                ignore_merges=bool(model.get("ignore_merges")), unk=model.get("unk_token"),
                template_bos=template_bos)


def _read_vocab_and_merges(folder, config, special_map):
    """GPT-2's original file pair. It does not say how text is pre-tokenized, so we accept it only
    for GPT-2's own tokenizer class (Qwen2's slow tokenizer, e.g., splits with another regex)."""
    cls = config.get("tokenizer_class")
    if cls not in (None, "GPT2Tokenizer", "GPT2TokenizerFast"):
        raise ValueError(f"{folder} has no tokenizer.json, and its vocab.json + merges.txt belong to "
                         f"{cls}, whose pre-tokenization we do not know; add the model's tokenizer.json")
    if config.get("add_prefix_space"):
        raise ValueError(f"{folder}: add_prefix_space is not supported")
    vocab = read_json(os.path.join(folder, "vocab.json"))
    merges = []
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line and not line.startswith("#version"):
                merges.append(line)
    added = {}
    if os.path.exists(os.path.join(folder, "added_tokens.json")):
        added.update(read_json(os.path.join(folder, "added_tokens.json")))
    # Tokens the config files call special, and that vocab.json lists, are special tokens too.
    names = [special_map.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    names += [config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    names += list(special_map.get("additional_special_tokens") or [])
    for name in filter(None, map(_token_name, names)):
        if name in vocab:
            added.setdefault(name, vocab[name])
    return dict(vocab=vocab, merges=merges, added=added, pattern=GPT2_PATTERN, nfc=False,
                ignore_merges=False, unk=None, template_bos=None)


def _has(node, type_name):
    """Whether a normalizer / pre-tokenizer / decoder, or one step of its Sequence, is of this type."""
    if not isinstance(node, dict):
        return False
    steps = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or []
    return node.get("type") == type_name or any(_has(s, type_name) for s in steps)


def _pattern(pre, path):
    """The tiktoken regex that splits text as this pre_tokenizer does; ValueError for the rest."""
    def bytelevel(node, use_regex):
        return (isinstance(node, dict) and node.get("type") == "ByteLevel"
                and node.get("use_regex", True) == use_regex)

    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    for node in [pre] + (steps or []):
        # a space before the first word: text would be split differently from the start
        if isinstance(node, dict) and node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
            raise ValueError(f"{path}: ByteLevel with add_prefix_space true is not supported")

    if bytelevel(pre, True):  # GPT-2
        return GPT2_PATTERN
    if steps and len(steps) == 2:
        split, last = (s if isinstance(s, dict) else {} for s in steps)
        if (split.get("type") == "Split" and bytelevel(last, False) and "Regex" in (split.get("pattern") or {})
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            # Llama-3, Qwen2. Hugging Face keeps text the regex does not match as pieces of their
            # own; tiktoken would silently drop it. Their regexes match everything anyway, but the
            # second alternative makes any other regex safe: a run of characters where the regex
            # cannot start a match, i.e. exactly the gap Hugging Face would keep.
            pattern = split["pattern"]["Regex"]
            return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"
        if (split.get("type") == "Digits" and split.get("individual_digits") is True
                and bytelevel(last, True)):  # SmolLM2
            return DIGITS_GPT2_PATTERN
    raise ValueError(f"{path}: pre-tokenizer {json.dumps(pre)[:300]} is not supported; supported are "
                     "ByteLevel (GPT-2), Sequence[Split(Regex, Isolated), ByteLevel(use_regex false)] "
                     "(Llama-3, Qwen2) and Sequence[Digits(individual_digits), ByteLevel] (SmolLM2)")


def _nfc(norm, path):
    """True when the normalizer is NFC (Qwen2), False when there is none; ValueError otherwise."""
    if norm is None:
        return False
    steps = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]
    if all(isinstance(s, dict) and s.get("type") == "NFC" for s in steps):
        return bool(steps)
    raise ValueError(f"{path}: normalizer {json.dumps(norm)[:200]} is not supported (only none or NFC)")


def _bytes_to_unicode():
    """GPT-2's table from bytes to the characters its vocab files are written in: printable
    Latin-1 characters stand for their own byte; the other 68 bytes (controls, space, 0x7F-0xA0,
    soft hyphen 0xAD) get U+0100, U+0101, ... in byte order, so the space is U+0120 'Ġ'."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _merge_results(vocab, merges, added, where):
    """The ids the merges make, after checking that they come in non-decreasing id order (what lets
    tiktoken's lowest-rank-first BPE reproduce Hugging Face's earliest-merge-first BPE)."""
    made, last = set(), -1
    for position, merge in enumerate(merges):
        # "a b" in older files, ["a", "b"] in newer ones (tokens never hold a real space: it is 'Ġ')
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2:
            raise ValueError(f"{where}: merge #{position} {merge!r} is not a pair of tokens")
        a, b = pair
        for t in (a, b, a + b):
            if t not in vocab or (t in added and added[t] == vocab[t]):
                raise ValueError(f"{where}: merge #{position} ({a} {b}) uses or makes {t!r}, which is "
                                 "not an ordinary vocabulary token")
        id = vocab[a + b]
        # Non-decreasing, not increasing: Llama-3's file (converted from tiktoken ranks) lists
        # every split of a token as a merge, all of them making the same id.
        if id < last:
            raise ValueError(f"{where}: merge #{position} ({a} {b}) makes id {id}, but an earlier merge "
                             f"made id {last}. tiktoken merges the lowest id first and Hugging Face "
                             "the earliest merge, so this vocabulary cannot be expressed as a "
                             "tiktoken encoding")
        last = id
        made.add(id)
    return made


def _ranks_and_specials(vocab, merges, added, ignore_merges, where):
    """tiktoken's mergeable_ranks (vocab bytes -> id) and special_tokens (added tokens), after
    checking that BPE by rank reproduces Hugging Face's BPE by merge order on this vocabulary.
    Also returns the bytes that have no token of their own (normally none)."""
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added_ids = set(added.values())
    ranks, seen = {}, {}
    for text, id in vocab.items():
        if text in added and added[text] == id:
            continue  # an added token that the vocab lists too: special, never merged
        if id in added_ids:
            raise ValueError(f"{where}: id {id} is both the vocab entry {text!r} and an added token")
        if id in seen:
            raise ValueError(f"{where}: id {id} is used by both {seen[id]!r} and {text!r}")
        seen[id] = text
        try:
            ranks[bytes(char_to_byte[c] for c in text)] = id
        except KeyError:
            raise ValueError(f"{where}: vocabulary entry {text!r} (id {id}) is not written in GPT-2's "
                             f"byte alphabet; is this a byte-level BPE? Supported are {SUPPORTED}") from None

    made = _merge_results(vocab, merges, added, where)

    # "ignore_merges": true (Llama-3) makes Hugging Face return a piece that is itself a token
    # without running the merges. tiktoken always does that. With rank-ordered merges, running
    # them on a token's own bytes leads back to that token anyway (we found no exception in
    # vocabularies learned by BPE), so the flag changes nothing -- except for a multi-byte token
    # that no merge makes. Hugging Face emits that one only with ignore_merges; without it, we
    # keep the token out of the BPE (decodable, never produced).
    specials = dict(added)
    if not ignore_merges:
        for data, id in list(ranks.items()):
            if len(data) > 1 and id not in made:
                del ranks[data]
                try:
                    specials.setdefault(data.decode("utf-8"), id)
                except UnicodeDecodeError:
                    pass  # never produced by encoding; decoding it fails like any hole
    if not ranks:
        raise ValueError(f"{where}: the vocabulary is empty")
    missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
    return ranks, specials, missing


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "bytes"
    text = sys.argv[2] if len(sys.argv) > 2 else "Hello, world! It's 2024: héllo 漢字 🙂"
    try:
        tok = {"bytes": byte_tokenizer, "gpt2": gpt2_tokenizer}.get(which, lambda: hf_tokenizer(which))()
    except ValueError as e:
        sys.exit(f"error: {e}")
    ids = tok.encode(text)
    print(tok)
    print(f"{len(text)} characters -> {len(ids)} tokens")
    print(" ".join(f"{i}:{tok.token_text(i)!r}" for i in ids))
    print("decoded:", tok.decode(ids))
