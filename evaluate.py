"""
Evaluation on a held-out instruction split: response loss, greedy answers and exact match, and the
expert load (how the router spreads the assignments), and the run's evaluation log (one JSON line per
evaluation in out_dir/log.jsonl). Used by train.py, compare.py and the tests.

    loss, counts = response_loss(model, encoded, batch_size=32, pad_id=tok.pad_id, device="cpu", ctx=nullcontext())
    accuracy = exact_match(model, tok, examples, max_new_tokens=16, device="cpu", ctx=nullcontext())
"""

import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.instruct import IGNORE, collate, decode_response, prompt_ids


def add_counts(total, routing):
    """total + the (n_moe_layers, E) expert counts of one forward's routing; None without MoE layers."""
    if routing is None:
        return total
    counts = routing.counts.float()
    return counts if total is None else total + counts


@torch.no_grad()
def response_loss(model, encoded, batch_size, pad_id, device, ctx):
    """Mean cross-entropy per response token over a split (prompt and padding positions excluded),
    and the expert counts summed over its real tokens."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count, expert_counts = 0, None
    for i in range(0, len(encoded), batch_size):
        idx, targets, mask = collate(encoded[i:i + batch_size], pad_id)
        idx, targets = idx.to(device), targets.to(device)      # the mask stays on the host (model.py, Unpadded)
        with ctx:
            logits, _, routing = model(idx, targets, mask)
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                                 ignore_index=IGNORE, reduction="sum")
        count += sum(sum(t != IGNORE for t in tgt) for _, tgt in encoded[i:i + batch_size])  # on the host
        expert_counts = add_counts(expert_counts, routing)
    model.train(was_training)
    return float(total) / max(count, 1), expert_counts


@torch.no_grad()
def greedy_answers(model, tok, examples, max_new_tokens, device, ctx, desc="generate", batch_size=64):
    """Greedy responses (with the KV cache) for a list of examples, decoded batch_size prompts at a
    time, right-padded with a token_mask (model.py, GPT.generate): the mask makes each answer the one
    its prompt gets alone (up to float rounding: identical in fp32 on the CPU); sorting the prompts
    by length keeps the padding, computed by attention only, small."""
    was_training = model.training
    model.eval()
    prompts = [prompt_ids(tok, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(examples)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        chunk = order[s:s + batch_size]
        # right-padded as in training (the targets collate also pads go unused); the mask stays on the host
        idx, _, mask = collate([(prompts[i], prompts[i]) for i in chunk], tok.pad_id)
        width = idx.size(1)
        with ctx:
            out = model.generate(idx.to(device), max_new_tokens, temperature=0, eos_id=tok.eos_id, n_vocab=tok.n_vocab,
                                 token_mask=mask)
        n_new = out.size(1) - width
        for row, i in zip(out.tolist(), chunk):
            answers[i] = decode_response(tok, row[len(prompts[i]):len(prompts[i]) + n_new])
    model.train(was_training)
    return answers


def exact_match(model, tok, examples, max_new_tokens, device, ctx, desc="exact match"):
    """Greedy exact-match accuracy per task family and their average (answers compared after
    stripping whitespace)."""
    answers = greedy_answers(model, tok, examples, max_new_tokens, device, ctx, desc)
    hits = {}
    for ex, ans in zip(examples, answers):
        hits.setdefault(ex["family"], []).append(ans.strip() == ex["output"].strip())
    acc = {fam: sum(v) / len(v) for fam, v in hits.items()}
    acc["average"] = sum(acc.values()) / len(acc)
    return acc


def load_summary(expert_counts):
    """Per-layer (min share, max share) of expert assignments; perfect balance is 1/E each."""
    if expert_counts is None:
        return None
    shares = expert_counts / expert_counts.sum(dim=1, keepdim=True).clamp(min=1)
    return [(round(float(s.min()), 4), round(float(s.max()), 4)) for s in shares]


def log_row(path, row):
    """Appends one evaluation's row to the log (log.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(run_dir):
    """The rows of run_dir/log.jsonl, in order."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]
