"""
Generation with the KV cache: the same answers as recomputing the whole prefix every step, for every
method and both families, also past block_size; chunked prefill; MoE layers route only the new token;
prompts of different lengths decoded together give each prompt's own answer.

    python -m pytest tests/test_generate.py -q
"""

import copy

import pytest
import torch

from helpers import order_one_weights
from model import GPT, GPTConfig, KVCache, pick_next_token
from upcycle import upcycle

V, T = 64, 24


def config(family, **overrides):
    base = dict(block_size=T, vocab_size=V, n_layer=2, n_head=4, n_embd=32)
    if family == "llama":
        base.update(family="llama", n_kv_head=2, ffn_dim=48, bias=False, qkv_bias=True, tie_embeddings=False,
                    rope_theta=100.0, rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                                        high_freq_factor=2.0, original_max_position_embeddings=8))
    return GPTConfig(**dict(base, **overrides))


@torch.no_grad()
def trained_model(family, method, seed=0):
    """A model with order-one weights, upcycled by `method`, its new weights non-zero as after training."""
    torch.manual_seed(seed)
    model = order_one_weights(GPT(config(family)), 0.3)
    if method != "full":
        upcycle(model, method, n_experts=4, top_k=2, adapter_dim=4, lora_rank=2, lora_targets="all" if method in
                ("lora", "pesc") else "attention", verbose=False)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "pesc", "sparse", "adapter", "lora"])
@pytest.mark.parametrize("n_prompt,n_new", [(5, 8), (10, 20), (T, 4), (T + 3, 3)])
def test_cache_gives_the_same_greedy_answer(family, method, n_prompt, n_new):
    """(10, 20) and (T, 4) run past block_size: the cache must hand over to the cropped window."""
    model = trained_model(family, method)
    idx = torch.randint(V, (3, n_prompt), generator=torch.Generator().manual_seed(1))
    with_cache = model.generate(idx, n_new, temperature=0, use_cache=True)
    without = model.generate(idx, n_new, temperature=0, use_cache=False)
    assert with_cache.shape == (3, n_prompt + n_new)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[:, n_prompt:].flatten().tolist())) > 1   # not a degenerate constant answer


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_matches_a_full_forward_position_by_position(family):
    """Logits of a prefill, then of one token at a time, then of a two-token chunk (the explicit mask
    path) equal the logits of one forward over the whole sequence."""
    # in float64, so that the bound holds whatever BLAS the CPU has (in float32 the chunk's masked
    # attention rounded 1.7e-4 away on the GPU machine's CPU, 1.4e-5 on this project's 2-core one)
    model = trained_model(family, "pesc").double()
    idx = torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _, _ = model(idx, idx)                     # with targets: logits of every position
        cache = KVCache(model.config.n_layer, 12)
        pieces = [model(idx[:, :5], cache=cache)[0]]
        for t in range(5, 9):
            pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
        chunk = model(idx[:, 9:12], targets=idx[:, 9:12], cache=cache)[0]   # all three positions' logits
    assert cache.length == 12
    stepwise = torch.cat(pieces, dim=1)                  # positions 4, 5, ..., 8
    assert full.std().item() > 0.5                       # logits of order one: 1e-9 is a real bound (float64 gives ~1e-15)
    assert (stepwise - full[:, 4:9]).abs().max().item() <= 1e-9
    assert (chunk - full[:, 9:12]).abs().max().item() <= 1e-9


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "pesc", "sparse", "adapter", "lora"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("lengths", [[7, 3, 12, 5, 11], [7, 3, 16, T - 1, 11]])
def test_prompts_of_different_lengths_decode_together_as_each_alone(family, method, use_cache, lengths):
    """Right-padded prompts with a token_mask: each row's new tokens equal those of the prompt
    generated alone without the cache (no padding, a batch of one, the whole window every step).
    With 9 new tokens the first lengths stay inside block_size (T = 24), so the cache decodes every
    step; in the second the rows of 16 and 23 run past it at different steps, and the cache hands
    over to per-row windows. The padding holds random ids: had any of it leaked into attention,
    the answers would move."""
    model = trained_model(family, method)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(V, (n,), generator=g) for n in lengths]
    idx = torch.randint(V, (len(lengths), max(lengths)), generator=g)      # the padding: random ids
    for row, p in zip(idx, prompts):
        row[:len(p)] = p
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    out = model.generate(idx, 9, temperature=0, use_cache=use_cache, token_mask=mask)
    assert out.shape == (len(lengths), max(lengths) + 9)
    for row, p in zip(out, prompts):
        alone = model.generate(p[None], 9, temperature=0, use_cache=False)[0]
        assert torch.equal(row[:len(p) + 9], alone)
    assert len({tuple(row[n:n + 9].tolist()) for row, n in zip(out, lengths)}) == len(lengths)   # real answers


def test_rows_of_different_lengths_stop_at_their_own_eos():
    """A row that produced eos_id keeps emitting it; the others go on; the output ends when all have."""
    model = trained_model("gpt2", "pesc")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(V, (n,), generator=g) for n in (4, 9)]
    alone = [model.generate(p[None], 12, temperature=0)[0, len(p):] for p in prompts]
    eos = alone[1][2].item()                                     # the longer prompt's third answer token
    idx = torch.zeros(2, 9, dtype=torch.long)
    idx[0, :4], idx[1] = prompts
    mask = torch.arange(9)[None, :] < torch.tensor([[4], [9]])
    out = model.generate(idx, 12, temperature=0, eos_id=eos, token_mask=mask)
    n_new, stops = out.size(1) - 9, []
    for row, p, want in zip(out, prompts, alone):
        new = row[len(p):len(p) + n_new]
        hit = (want == eos).nonzero()
        stops.append(int(hit[0]) if len(hit) else 12)            # 12: this row never produces eos
        assert torch.equal(new[:stops[-1] + 1], want[:min(stops[-1] + 1, n_new)])   # its own answer up to its eos
        assert (new[stops[-1]:] == eos).all()                    # then eos only
    assert n_new == min(12, max(stops) + 1)                      # ends with the last row's eos, or at 12


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_refuses_bad_token_masks(use_cache):
    model = trained_model("gpt2", "full")
    idx = torch.randint(V, (2, 6))
    left = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])      # row 1 padded on the left
    with pytest.raises(ValueError, match="right padding"):
        model.generate(idx, 3, temperature=0, use_cache=use_cache, token_mask=left)
    with pytest.raises(ValueError, match="must match idx"):
        model.generate(idx, 3, temperature=0, use_cache=use_cache, token_mask=torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(model.generate(idx, 0, use_cache=use_cache), idx)   # nothing asked: the prompts


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_without_targets_gives_each_rows_last_real_token(family):
    """With a token_mask and no targets, the logits are those of each row's last real token: the
    same as a full forward of that row alone, read at its last position (float64)."""
    model = trained_model(family, "pesc").double()
    g = torch.Generator().manual_seed(8)
    lengths = [5, 12, 1]
    idx = torch.randint(V, (3, 12), generator=g)
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        last, _, _ = model(idx, token_mask=mask)
        for b, n in enumerate(lengths):
            full, _, _ = model(idx[b:b + 1, :n], idx[b:b + 1, :n])     # with targets: every position's logits
            assert (last[b, 0] - full[0, n - 1]).abs().max().item() <= 1e-9
    assert last.shape == (3, 1, model.config.vocab_size)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_refuses_a_row_without_tokens(use_cache):
    model = trained_model("gpt2", "full")
    mask = torch.tensor([[True] * 4, [False] * 4])
    with pytest.raises(ValueError, match="at least one prompt token"):
        model.generate(torch.randint(V, (2, 4)), 3, temperature=0, use_cache=use_cache, token_mask=mask)


def test_the_cache_refuses_a_token_mask_after_the_prefill():
    model = trained_model("gpt2", "full")
    cache = KVCache(model.config.n_layer, 12)
    idx = torch.randint(V, (2, 4))
    model(idx, cache=cache)
    with pytest.raises(ValueError, match="prefill only"):
        model(idx, token_mask=torch.ones(2, 4, dtype=torch.bool), cache=cache)


def test_moe_layers_route_only_the_new_token():
    model = trained_model("llama", "pesc")
    seen = []
    for layer in model.moe_layers():
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    idx = torch.randint(V, (2, 6), generator=torch.Generator().manual_seed(3))
    model.generate(idx, 4, temperature=0)
    n_layers = len(model.moe_layers())
    assert seen[:n_layers] == [6] * n_layers          # the prefill
    assert seen[n_layers:] == [1] * (3 * n_layers)    # then one position per step (the last token is not fed)


def test_sampling_with_a_seed_is_reproducible_and_eos_stops_every_row():
    model = trained_model("gpt2", "pesc")
    idx = torch.randint(V, (4, 5), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    a = model.generate(idx, 10, temperature=1.0, top_k=10)
    torch.manual_seed(0)
    b = model.generate(idx, 10, temperature=1.0, top_k=10)
    assert torch.equal(a, b)
    greedy = model.generate(idx, 10, temperature=0)
    eos = greedy[0, 5].item()                          # the first row's first answer token
    out = model.generate(idx, 10, temperature=0, eos_id=eos)
    assert (out[0, 5:] == eos).all()                   # a finished row keeps emitting eos
    assert out.size(1) < 15 or (out[:, 5:] == eos).any(dim=1).all()


def test_ids_above_the_tokenizer_are_never_generated():
    """vocab_size is rounded up past the tokenizer; those padding ids never come out, greedy or sampled."""
    logits = torch.zeros(200, 64)
    logits[:, 50:] = 10.0                              # the padding ids would win every argmax
    logits[:, :50] = torch.randn(200, 50)
    assert pick_next_token(logits.clone(), 0, None, None).min().item() >= 50   # without n_vocab they win
    assert pick_next_token(logits.clone(), 0, None, 50).max().item() < 50
    torch.manual_seed(0)
    assert pick_next_token(logits.clone(), 1.0, None, 50).max().item() < 50
    picked = pick_next_token(logits.clone(), 1.0, 3, 50)                  # top-3 of the real ids only
    top3 = logits[:, :50].topk(3).indices
    assert (picked == top3).any(dim=1).all()


def test_deepcopied_model_generates_alike():
    """The cache is per call (nothing of it stays in the model): two calls in a row agree."""
    model = trained_model("llama", "sparse")
    idx = torch.randint(V, (2, 7), generator=torch.Generator().manual_seed(5))
    first = model.generate(idx, 6, temperature=0)
    assert torch.equal(first, model.generate(idx, 6, temperature=0))
    assert torch.equal(first, copy.deepcopy(model).generate(idx, 6, temperature=0))
