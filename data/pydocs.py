"""
The offline pretraining corpus: the documentation that ships inside CPython itself,
`pydoc_data.topics.topics`, the ~79 help topics that `help("for")` and friends
print (~465K characters of English prose plus Python snippets). It is on every
machine that has Python, so the whole pipeline runs with no download. It is
tokenized with tokenizer.byte_tokenizer() (one token per UTF-8 byte plus EOS).

    python -m data.pydocs    # prints corpus and token statistics
"""

import numpy as np
import torch


def load_pydocs_documents():
    """All pydoc help topics, in sorted key order: one document per topic."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def encode_corpus(tok, documents):
    """Token ids of the documents as one uint16 stream, each document followed by EOS (GPT-2 does
    the same). Pretraining thus teaches the base what EOS means, "the text is over", which the
    instruction-tuned model must emit after its answer; a base that never saw EOS can only learn it
    through the few tuned parameters, and learns it badly. EOS-like strings inside a document stay
    plain text."""
    if tok.n_vocab > 2**16:
        raise ValueError(f"tokenizer {tok.name} has {tok.n_vocab} tokens; ids do not fit in uint16")
    ids = []
    for doc in documents:
        ids.extend(tok.encode(doc))
        ids.append(tok.eos_id)
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


def pretrain_batch(data, step, batch_size, block_size, seed):
    """Random crops of the corpus (x, y), y shifted by one; the crops depend only on (seed, step),
    so a rerun sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


if __name__ == "__main__":
    from tokenizer import byte_tokenizer
    docs = load_pydocs_documents()
    ids = encode_corpus(byte_tokenizer(), docs)
    train, val = train_val_split(ids)
    print(f"pydocs corpus: {len(docs)} documents, {sum(map(len, docs)):,} chars, {len(ids):,} byte tokens "
          f"(train {len(train):,}, val {len(val):,})")
