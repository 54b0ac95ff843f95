"""
Tests for the PESC core: the adapters, the top-k router, the load-balancing loss, the two MoE
layers and their two dispatch paths, and upcycle() (function preservation, trainable set, parameter
counts, argument checks). CPU only, tiny models, a few seconds in all.

    python -m pytest tests/test_core.py -q

Tolerances are written next to each check. fp32 checks use max-abs-diff bounds; gradchecks run in
float64 with logits that have clear top-k gaps, so the finite differences never flip a choice.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from adapters import Adapter, LoRALinear
from model import GPT, MLP, GPTConfig
from moe import PESCMoE, SparseUpcycledMoE, TopKRouter, load_balancing_loss, route
from upcycle import count_params, upcycle

V, T, L, D = 64, 16, 4, 32  # vocab, block size, layers, width of the tiny GPT


def tiny_config(**overrides):
    return GPTConfig(**dict(dict(block_size=T, vocab_size=V, n_layer=L, n_head=4, n_embd=D), **overrides))


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def random_gpt(seed=0, **overrides):
    """A dense GPT with weights of order one (the default 0.02 init gives logits of order 0.1, which
    would make a 1e-5 tolerance weak): matrices N(0, 0.2), norms' gains 1 + N(0, 0.1), biases N(0, 0.1)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, 0.2)
        elif "ln" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1)
        else:
            p.normal_(0.0, 0.1)
    return model


@torch.no_grad()
def spread_routers(model, idx, seed=0, logit_std=3.0):
    """Router weights that spread the tokens of idx over the experts. The router's own 0.02 init gives
    near-tied logits, and even a large random W_r often leaves an expert without a single token,
    because the residual stream has a big component shared by all tokens. So: random directions
    orthogonal to the mean of each MoE layer's input, scaled to logits of std logit_std. (Tests that
    need every expert hit still assert it.)"""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0].flatten(0, -2)))
             for layer in model.moe_layers()]
    model(idx)
    for hook in hooks:
        hook.remove()
    g = torch.Generator().manual_seed(seed)
    for layer in model.moe_layers():
        h = inputs[layer]                                                  # (N, d)
        mean = F.normalize(h.mean(dim=0), dim=0)                           # (d,)
        w = torch.randn(layer.n_experts, h.size(1), generator=g)           # (E, d)
        w -= (w @ mean)[:, None] * mean                                    # w . mean = 0
        w *= logit_std / (h @ w.t()).std()
        layer.router.gate.weight.copy_(w)


def tokens(seed, B=2, t=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, t), generator=g), torch.randint(V, (B, t), generator=g)


# -----------------------------------------------------------------------------
# adapters

def test_adapter_starts_as_zero_and_is_scaled():
    torch.manual_seed(0)
    adapter = Adapter(16, 4, scale=0.5)
    u = torch.randn(10, 16)
    assert torch.count_nonzero(adapter(u)) == 0  # W_up = 0: delta(u) = 0 exactly, A(u) = u
    with torch.no_grad():
        adapter.up.weight.normal_()
    expected = 0.5 * F.gelu(u @ adapter.down.weight.t()) @ adapter.up.weight.t()
    assert max_diff(adapter(u), expected) <= 1e-6
    assert torch.count_nonzero(adapter(u)) > 0


def test_lora_starts_as_base_and_merge_roundtrips():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    lora = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(5, 16)
    assert torch.equal(lora(x), F.linear(x, w0, b0))  # B = 0: exactly the base layer
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert lora.lora_A.requires_grad and lora.lora_B.requires_grad

    with torch.no_grad():
        lora.lora_B.normal_()
    y = lora(x)
    expected = x @ w0.t() + b0 + (8.0 / 4) * x @ lora.lora_A.t() @ lora.lora_B.t()
    assert max_diff(y, expected) <= 1e-5
    assert max_diff(y, F.linear(x, w0, b0)) > 0.1  # the update is not negligible

    lora.merge()
    assert lora.merged
    assert max_diff(base.weight, w0 + 2.0 * lora.lora_B @ lora.lora_A) <= 1e-6
    assert max_diff(lora(x), y) <= 1e-5  # merged forward == unmerged forward
    lora.merge()  # a second merge is a no-op
    assert max_diff(lora(x), y) <= 1e-5
    lora.unmerge()
    assert not lora.merged
    assert max_diff(base.weight, w0) <= 1e-6
    assert max_diff(lora(x), y) <= 1e-6


def test_init_weights_keeps_adapter_up_projection_at_zero():
    """The ZERO_INIT marker: re-running GPT._init_weights on an upcycled model (as a from-scratch
    path would) must keep every W_up at zero, so the model still computes the dense function."""
    model = random_gpt()
    upcycle(model, n_experts=4, top_k=2, adapter_dim=4, verbose=False)
    model.apply(model._init_weights)
    ups = [e.up.weight for layer in model.moe_layers() for e in layer.experts]
    assert len(ups) == 4 * L and all(torch.count_nonzero(w) == 0 for w in ups)
    assert all(torch.count_nonzero(e.down.weight) > 0 for layer in model.moe_layers() for e in layer.experts)


# -----------------------------------------------------------------------------
# router

def test_route_hand_example():
    weights, indices, probs, counts = route(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    assert indices.tolist() == [[1, 2]]
    # softmax([3, 2]) = [e / (1 + e), 1 / (1 + e)]
    assert max_diff(weights, torch.tensor([[0.7310586, 0.2689414]])) <= 1e-6
    assert counts.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("top_k", [1, 2, 3, 8])
def test_route_invariants(top_k):
    g = torch.Generator().manual_seed(top_k)
    logits = 3.0 * torch.randn(50, 8, generator=g)  # continuous random values: no ties
    weights, indices, probs, counts = route(logits, top_k)
    assert weights.shape == (50, top_k) and weights.dtype == torch.float32
    assert max_diff(weights.sum(-1), torch.ones(50)) <= 1e-6
    assert torch.equal(indices, torch.topk(logits, top_k, dim=-1).indices)
    assert max_diff(weights, F.softmax(logits.gather(1, indices), dim=-1)) <= 1e-6
    # Eq. 9 equals the full softmax renormalised over the kept experts
    kept = F.softmax(logits, dim=-1).gather(1, indices)
    assert max_diff(weights, kept / kept.sum(-1, keepdim=True)) <= 1e-6
    assert max_diff(probs, F.softmax(logits, dim=-1)) <= 1e-6
    assert counts.dtype == torch.int64 and counts.sum().item() == 50 * top_k
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=8))


def test_router_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2)
    h = torch.randn(10, 16)
    reference = router(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(h, router.gate.weight).dtype == torch.bfloat16  # autocast is really on
        logits = router(h)
        weights, _, probs, _ = route(logits, 2)
        logits_from_bf16 = router(h.bfloat16())
    assert logits.dtype == weights.dtype == probs.dtype == logits_from_bf16.dtype == torch.float32
    assert torch.equal(logits, reference)  # the same fp32 numbers as without autocast


def test_router_jitter_only_in_training_and_not_in_place():
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2, jitter=0.5)
    h = torch.randn(10, 16)
    h_before = h.clone()
    clean = F.linear(h, router.gate.weight)
    router.eval()
    assert torch.equal(router(h), clean)
    router.train()
    noisy = router(h)
    assert torch.equal(h, h_before)  # the input is untouched
    assert max_diff(noisy, clean) > 1e-3  # and the jitter did act


@pytest.mark.parametrize("layer_cls", [PESCMoE, SparseUpcycledMoE])
def test_experts_never_see_the_jitter(layer_cls):
    """Mixtral applied jitter to the hidden states in place, so its experts saw noisy inputs.
    Here, at upcycling time, both layers must still equal the FFN on the clean input, in training."""
    torch.manual_seed(0)
    ffn = MLP(tiny_config())
    layer = layer_cls(ffn, D, n_experts=4, top_k=2, router_jitter=0.5).train()
    with torch.no_grad():
        layer.router.gate.weight.normal_()
    h = torch.randn(2, 5, D)
    h_before = h.clone()
    y, _ = layer(h)
    assert torch.equal(h, h_before)
    assert max_diff(y, ffn(h)) <= 1e-6


# -----------------------------------------------------------------------------
# load-balancing loss (Eq. 10 without alpha)

def test_balance_loss_is_one_for_balanced_routing():
    # top-1 on the diagonal, and the full softmax is the same in every row up to a permutation
    logits = 2.0 * torch.eye(4)
    assert abs(load_balancing_loss(logits, 1).item() - 1.0) <= 1e-6
    # k = 2: assignments {0,1}, {1,2}, {2,3}, {3,0}: two of eight per expert
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0], [-1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 3.0, 2.0], [2.0, 0.0, -1.0, 3.0]])
    assert abs(load_balancing_loss(logits, 2).item() - 1.0) <= 1e-6
    # f uniform makes it exactly 1 whatever P is: E * sum_i (1/E) P_i = sum_i P_i = 1
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g)
    logits[torch.arange(8), torch.arange(8) % 4] = 10.0  # top-1 of row n is n % 4
    assert abs(load_balancing_loss(logits, 1).item() - 1.0) <= 1e-6


def test_balance_loss_hand_computed():
    # logits = log p, so the full softmax of each row is p exactly
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1],     # top-1: 0
                      [0.4, 0.3, 0.2, 0.1],     # 0
                      [0.1, 0.6, 0.2, 0.1],     # 1
                      [0.1, 0.2, 0.3, 0.4]])    # 3
    # f = [2/4, 1/4, 0, 1/4]; P = column means = [0.325, 0.3, 0.2, 0.175]
    # E * sum f_i P_i = 4 * (0.5 * 0.325 + 0.25 * 0.3 + 0 + 0.25 * 0.175) = 1.125
    assert abs(load_balancing_loss(p.log(), 1).item() - 1.125) <= 1e-6

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05],   # top-2: {0, 1}
                      [0.1, 0.2, 0.3, 0.4],     # {3, 2}
                      [0.35, 0.05, 0.4, 0.2],   # {2, 0}
                      [0.25, 0.45, 0.1, 0.2]])  # {1, 0}
    # f = [3/8, 2/8, 2/8, 1/8]; P = [0.3, 0.25, 0.2375, 0.2125]
    # 4 * (0.375 * 0.3 + 0.25 * 0.25 + 0.25 * 0.2375 + 0.125 * 0.2125) = 1.04375
    assert abs(load_balancing_loss(p.log(), 2).item() - 1.04375) <= 1e-6


def test_balance_loss_grows_with_skew_and_has_a_real_gradient():
    g = torch.Generator().manual_seed(0)
    N, E = 16, 4
    skewed = torch.randn(N, E, generator=g)
    skewed[:, 0] += 4.0  # every token prefers expert 0
    skewed.requires_grad_(True)
    loss = load_balancing_loss(skewed, 1)
    assert loss.item() > 2.5  # all the load on one expert with P_0 near 1: close to E
    loss.backward()
    # analytic gradient of E * sum_i f_i P_i with f constant: E/N * p_nj * (f_j - sum_i f_i p_ni)
    probs = F.softmax(skewed.detach(), dim=-1)
    f = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected = E / N * probs * (f - (probs * f).sum(-1, keepdim=True))
    assert max_diff(skewed.grad, expected) <= 1e-6
    assert skewed.grad.abs().max().item() > 1e-3
    assert (skewed.grad[:, 0] > 0).all()  # gradient descent lowers the overloaded expert's logit

    # The official code's loss was the constant E whatever the routing; ours moves with it.
    balanced = load_balancing_loss(2.0 * torch.eye(4), 1).item()
    assert abs(balanced - loss.item()) > 1.0


def test_balance_loss_token_mask_excludes_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    logits[4:, 2] += 10.0  # the padding rows would skew the routing
    logits.requires_grad_(True)
    mask = torch.tensor([True, True, True, True, False, False])
    masked = load_balancing_loss(logits, 2, mask)
    unpadded = load_balancing_loss(logits.detach()[:4], 2)
    assert abs(masked.item() - unpadded.item()) <= 1e-6
    assert abs(load_balancing_loss(logits.detach(), 2).item() - unpadded.item()) > 1e-2  # padding matters
    masked.backward()
    assert torch.count_nonzero(logits.grad[4:]) == 0
    assert torch.count_nonzero(logits.grad[:4]) > 0


# -----------------------------------------------------------------------------
# the MoE layers: two dispatch paths, gradchecks

@torch.no_grad()
def randomise(layer, router_std=2.0, up_std=0.5):
    """Non-zero adapters (W_up starts at 0) and a router with clear logit gaps."""
    layer.router.gate.weight.normal_(0.0, router_std)
    for expert in layer.experts:
        if isinstance(expert, Adapter):
            expert.up.weight.normal_(0.0, up_std)


def test_loop_and_dense_dispatch_agree():
    torch.manual_seed(0)
    cfg = tiny_config(n_embd=16)
    dense = PESCMoE(MLP(cfg), 16, n_experts=4, top_k=2, adapter_dim=3, adapter_scale=0.5, dispatch="dense")
    randomise(dense)
    loop = PESCMoE(MLP(cfg), 16, n_experts=4, top_k=2, adapter_dim=3, adapter_scale=0.5, dispatch="loop")
    loop.load_state_dict(dense.state_dict())
    h = torch.randn(2, 5, 16)
    h_dense, h_loop = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    out_weights = torch.randn(2, 5, 16)
    y_dense, aux_dense = dense(h_dense)
    y_loop, aux_loop = loop(h_loop)
    assert (dense.last_counts > 0).all()  # every expert is hit, so every adapter gets a gradient
    assert not any(p.requires_grad for p in dense.ffn.parameters())  # the shared FFN is frozen
    assert max_diff(dense(h)[0], dense.ffn(h)) > 1e-2  # the adapters are not zero
    assert max_diff(y_dense, y_loop) <= 1e-6
    assert abs(aux_dense.item() - aux_loop.item()) <= 1e-6
    ((y_dense * out_weights).sum() + aux_dense).backward()
    ((y_loop * out_weights).sum() + aux_loop).backward()
    assert max_diff(h_dense.grad, h_loop.grad) <= 1e-6
    loop_params = dict(loop.named_parameters())
    for name, p in dense.named_parameters():
        q = loop_params[name]
        if not p.requires_grad:  # the frozen FFN
            assert p.grad is None and q.grad is None, name
            continue
        assert torch.count_nonzero(p.grad) > 0, name
        assert max_diff(p.grad, q.grad) <= 1e-6, name


def gradcheck_layer(layer, h, param_names, fast_mode=False):
    """float64 gradcheck of layer(h) -> (y, aux) w.r.t. h (when it requires grad) and the named
    parameters, through torch.func.functional_call so that the parameters are plain inputs.
    fast_mode checks u^T J v for random u, v instead of every column of J (for many inputs)."""
    params = dict(layer.named_parameters())

    def f(h, *tensors):
        return functional_call(layer, dict(zip(param_names, tensors)), (h,))

    inputs = (h,) + tuple(params[n].detach().clone().requires_grad_(True) for n in param_names)
    return torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast_mode)


def small_layer(kind, dispatch="dense"):
    """N = 6 tokens, d = 8, E = 4, k = 2, r = 3, in float64, with logits that have clear top-k gaps
    (checked): eps = 1e-6 moves a logit by ~1e-5 at most, far less than the gap."""
    torch.manual_seed(0)
    cfg = tiny_config(n_embd=8, n_head=2)
    if kind == "pesc":
        layer = PESCMoE(MLP(cfg), 8, n_experts=4, top_k=2, adapter_dim=3, adapter_scale=0.5, dispatch=dispatch)
    else:
        layer = SparseUpcycledMoE(MLP(cfg), 8, n_experts=4, top_k=2)
        with torch.no_grad():  # distinct experts, so that the router's gradient is not zero
            for expert in layer.experts:
                for p in expert.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    randomise(layer)
    layer.double()
    h = torch.randn(6, 8, dtype=torch.float64)
    top = torch.topk(layer.router(h), 3, dim=-1).values
    assert (top[:, 1] - top[:, 2]).min().item() > 1e-2  # the k-th and (k+1)-th logits are apart
    return layer, h


def adapter_names(layer):
    return [n for n, _ in layer.named_parameters() if n.startswith("experts.")]


@pytest.mark.parametrize("dispatch", ["dense", "loop"])
def test_gradcheck_pesc_adapter_weights(dispatch):
    layer, h = small_layer("pesc", dispatch)
    assert len(adapter_names(layer)) == 8  # W_down and W_up of four experts
    assert gradcheck_layer(layer, h, adapter_names(layer))


def test_gradcheck_sparse_expert_weights():
    layer, h = small_layer("sparse")
    assert len(adapter_names(layer)) == 16  # c_fc / c_proj weight and bias of four FFN copies
    assert gradcheck_layer(layer, h, adapter_names(layer), fast_mode=True)  # 2208 inputs


def test_router_keeps_float64():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2).double()
    logits = router(torch.randn(6, 8, dtype=torch.float64))
    weights, _, probs, _ = route(logits, 2)
    assert logits.dtype == weights.dtype == probs.dtype == torch.float64


@pytest.mark.parametrize("kind,dispatch", [("pesc", "dense"), ("pesc", "loop"), ("sparse", "loop")])
def test_gradcheck_wrt_input(kind, dispatch):
    layer, h = small_layer(kind, dispatch)
    assert gradcheck_layer(layer, h.requires_grad_(True), [])


# -----------------------------------------------------------------------------
# upcycling: function preservation, trainable set, parameter counts

@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("layers", ["all", "every_other"])
@pytest.mark.parametrize("n_experts,top_k", [(1, 1), (4, 1), (4, 2), (8, 2), (16, 4)])
@pytest.mark.parametrize("method,dispatch", [("pesc", "dense"), ("pesc", "loop"), ("sparse", "dense")])
def test_upcycled_model_computes_the_dense_function(method, dispatch, n_experts, top_k, layers, lora_rank):
    dense = random_gpt().eval()
    idx, targets = tokens(1)
    with torch.no_grad():
        reference, _ = dense(idx, targets)
    assert reference.std().item() > 0.5  # logits of order one: 1e-5 is a real bound
    model = upcycle(copy.deepcopy(dense), method=method, n_experts=n_experts, top_k=top_k, adapter_dim=4,
                    layers=layers, lora_rank=lora_rank, dispatch=dispatch, verbose=False).eval()
    spread_routers(model, idx)
    with torch.no_grad():
        logits, _ = model(idx, targets)
    assert len(model.moe_layers()) == (L if layers == "all" else L // 2)
    assert max_diff(logits, reference) <= 1e-5
    if n_experts > top_k:  # the routing really mixes experts, and still nothing changes
        assert all((layer.last_counts > 0).sum().item() > top_k for layer in model.moe_layers())


def expected_trainable(model, method, n_experts, lora_rank):
    names = set()
    for name, _ in model.named_parameters():
        if ".mlp.experts." in name:  # PESC: the adapters; sparse: the FFN copies
            names.add(name)
        elif ".mlp.router." in name and n_experts > 1:
            names.add(name)
        elif ".lora_" in name and lora_rank > 0:
            names.add(name)
    return names


@pytest.mark.parametrize("method,n_experts,top_k,layers,lora_rank", [
    ("pesc", 4, 2, "all", 0),
    ("pesc", 4, 2, "every_other", 4),
    ("pesc", 8, 2, "all", 4),
    # One expert is the paper's dense baseline (one adapter per FFN): the gate is the softmax of a
    # single logit, always exactly 1, and Eq. 10 is the constant 1, so the router could only ever
    # get a zero gradient (and be shrunk by weight decay for nothing). upcycle() freezes it.
    ("pesc", 1, 1, "all", 4),
    ("sparse", 4, 2, "all", 0),
    ("sparse", 4, 1, "every_other", 4),
])
def test_trainable_set_and_frozen_weights(method, n_experts, top_k, layers, lora_rank):
    model = random_gpt()
    upcycle(model, method=method, n_experts=n_experts, top_k=top_k, adapter_dim=4, layers=layers,
            lora_rank=lora_rank, verbose=False)
    idx, targets = tokens(2, B=4)
    spread_routers(model, idx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model, method, n_experts, lora_rank)
    n_moe = len(model.moe_layers())
    per_layer = n_experts * (2 if method == "pesc" else 4) + (n_experts > 1)
    assert len(trainable) == n_moe * per_layer + (4 * L if lora_rank else 0)  # the set is what we think

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every tensor, frozen too
    model.train()
    # Two steps. On step 0 every W_up (PESC) and every LoRA B is zero, so the gradients of W_down and
    # LoRA A are exactly zero (they only reach the loss through W_up / B). Step 0 moves W_up and B
    # off zero; on step 1 every trainable tensor has a non-zero gradient.
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        assert torch.isfinite(loss) and loss.item() > 1.0  # random targets: a real cross-entropy
        loss.backward()
        for layer in model.moe_layers():
            assert (layer.last_counts > 0).all()  # every expert is hit: it can get a gradient
        if step == 0 and method == "pesc":
            assert all(torch.count_nonzero(p.grad) == 0 for n, p in model.named_parameters()
                       if n.endswith("down.weight") or n.endswith("lora_A"))
        if step == 1:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
                else:
                    assert p.grad is None, name
        opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # bit-identical despite weight decay
        else:
            assert not torch.equal(p, start[name]), name


@pytest.mark.parametrize("method,E,k,r,d,layers,lora", [
    ("pesc", 8, 2, 4, 32, "all", 0),
    ("pesc", 4, 1, 8, 32, "every_other", 2),
    ("pesc", 16, 4, 2, 64, "all", 8),
    ("pesc", 1, 1, 6, 48, "all", 4),
    ("sparse", 4, 2, 0, 32, "all", 0),
    ("sparse", 8, 1, 0, 48, "every_other", 4),
])
def test_param_counts_match_closed_forms(method, E, k, r, d, layers, lora):
    model = GPT(tiny_config(n_embd=d))
    dense = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d  # lm_head is tied to wte
    assert count_params(model) == dict(total=dense, trainable=dense, active=dense)
    upcycle(model, method=method, n_experts=E, top_k=k, adapter_dim=max(r, 1), layers=layers,
            lora_rank=lora, verbose=False)
    n_moe = L if layers == "all" else L // 2
    ffn = 8 * d * d + 5 * d                 # c_fc (d -> 4d) and c_proj (4d -> d), with biases
    expert = 2 * d * r if method == "pesc" else ffn
    router = d * E
    lora_params = L * lora * ((d + 3 * d) + (d + d))  # c_attn (d -> 3d) and c_proj (d -> d) per block
    total = dense + n_moe * (E * expert + router) + lora_params - (n_moe * ffn if method == "sparse" else 0)
    trainable = n_moe * (E * expert + (router if E > 1 else 0)) + lora_params
    active = total - n_moe * (E - k) * expert
    assert count_params(model) == dict(total=total, trainable=trainable, active=active)


# -----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(n_experts=2, top_k=3), r"top_k \(3\) cannot exceed n_experts \(2\)"),
    (dict(n_experts=0, top_k=1), "n_experts must be a positive int, got 0"),
    (dict(n_experts=4, top_k=0), "top_k must be a positive int, got 0"),
    (dict(adapter_dim=0), "adapter_dim must be a positive int, got 0"),
    (dict(method="dense"), "unknown upcycling method 'dense'"),
    (dict(layers="odd"), "layers must be one of .*, got 'odd'"),
    (dict(dispatch="triton"), "dispatch must be 'loop' or 'dense', got 'triton'"),
    (dict(lora_rank=-1), "lora_rank must be an int >= 0"),
])
def test_upcycle_rejects_bad_arguments_and_leaves_the_model_alone(kwargs, message):
    model = random_gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        upcycle(model, **dict(dict(adapter_dim=4, verbose=False), **kwargs))
    assert model.upcycle_args is None and model.moe_layers() == []
    assert all(p.requires_grad and torch.equal(p, before[n]) for n, p in model.named_parameters())
    upcycle(model, n_experts=4, top_k=2, adapter_dim=4, verbose=False)  # still a good dense model
    assert len(model.moe_layers()) == L


@pytest.mark.parametrize("second", ["pesc", "sparse"])
def test_upcycle_twice_is_an_error(second):
    model = upcycle(random_gpt(), n_experts=4, top_k=2, adapter_dim=4, layers="every_other", verbose=False)
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(model, method=second, verbose=False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_embd=0), "n_embd must be a positive int, got 0"),
    (dict(n_head=0), "n_head must be a positive int, got 0"),
    (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
    (dict(gelu="relu"), "gelu must be 'none' or 'tanh'"),
])
def test_gpt_config_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_layers_reject_bad_sizes():
    ffn = MLP(tiny_config())
    with pytest.raises(ValueError, match=r"top_k \(5\) cannot exceed n_experts \(4\)"):
        PESCMoE(ffn, D, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"top_k \(3\) cannot exceed n_experts \(2\)"):
        SparseUpcycledMoE(ffn, D, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="Adapter sizes must be positive"):
        Adapter(D, 0)
    with pytest.raises(ValueError, match="LoRA rank must be positive, got 0"):
        LoRALinear(nn.Linear(4, 4), rank=0)
