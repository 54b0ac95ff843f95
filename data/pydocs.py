"""
The offline pretraining corpus and the tokenizers.

The corpus is the documentation that ships inside CPython itself:
`pydoc_data.topics.topics`, the ~79 help topics that `help("for")` and friends
print (~465K characters of English prose plus Python snippets). It is on every
machine that has Python, so the whole pipeline runs with no download.

The default tokenizer is byte-level: one token per UTF-8 byte plus <|endoftext|>.
It needs no vocabulary file, round-trips any text, and keeps the embedding table
tiny, which suits the small models this repo trains on a CPU. GPT-2's BPE is
also available when tiktoken can load (or has cached) its files.

    python -m data.pydocs    # prints corpus and token statistics
"""

import numpy as np
import tiktoken

EOT = "<|endoftext|>"
# 256 byte tokens + EOT = 257, rounded up to a multiple of 64 because matmuls
# on padded vocabularies are faster; the model never predicts the spare ids.
BYTE_VOCAB_SIZE = 320
TOKENIZERS = ("bytes", "gpt2")

# GPT-2's pre-split regex. For a byte-level vocabulary it changes nothing about
# the output ids (every piece falls back to single bytes anyway); tiktoken just
# needs some pattern to chunk the text by.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_pydocs_documents():
    """All pydoc help topics, in sorted key order: one document per topic."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def byte_tokenizer():
    """A tiktoken Encoding whose tokens are the 256 raw bytes, plus EOT = 256."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=GPT2_PAT,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
        explicit_n_vocab=257,
    )


def get_tokenizer(name):
    """Look a tokenizer up by name: 'bytes' (offline) or 'gpt2' (needs its BPE files)."""
    if name == "bytes":
        return byte_tokenizer()
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # network errors come in many types; all mean the same here
            raise RuntimeError(
                "could not load the GPT-2 BPE files "
                f"({type(e).__name__}: {e}). tiktoken downloads them once and caches "
                "them in $TIKTOKEN_CACHE_DIR (default: <tmp dir>/data-gym-cache). Run "
                "`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once on a "
                "machine with internet access (with the same TIKTOKEN_CACHE_DIR), copy that "
                "directory here if needed, or use tokenizer='bytes', which needs no files."
            ) from e
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")


def encode_corpus(enc, documents):
    """Token ids of the documents as one uint16 stream, each document followed by EOT (GPT-2 does
    the same). Pretraining thus teaches the base what EOT means, "the text is over", which the
    instruction-tuned model must emit after its answer; a base that never saw EOT can only learn it
    through the few tuned parameters, and learns it badly. EOT-like strings inside a document stay
    plain text."""
    if enc.n_vocab > 2**16:
        raise ValueError(f"tokenizer {enc.name} has {enc.n_vocab} tokens; ids do not fit in uint16")
    ids = []
    for doc in documents:
        ids.extend(enc.encode_ordinary(doc))
        ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16)


def train_val_split(ids, val_fraction=0.1):
    """Split a token stream into a contiguous (train, val) pair; val is the tail."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(len(ids) * val_fraction)
    n_train = len(ids) - n_val
    if n_val == 0 or n_train == 0:
        raise ValueError(f"cannot split {len(ids)} tokens with val_fraction={val_fraction}")
    return ids[:n_train], ids[n_train:]


if __name__ == "__main__":
    docs = load_pydocs_documents()
    enc = byte_tokenizer()
    ids = encode_corpus(enc, docs)
    train, val = train_val_split(ids)
    print(f"pydocs corpus: {len(docs)} documents, {sum(map(len, docs)):,} chars, {len(ids):,} byte tokens "
          f"(train {len(train):,}, val {len(val):,})")
