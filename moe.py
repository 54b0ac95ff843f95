"""
Mixture-of-Experts layers for PESC (Wu et al., 2024, arXiv 2401.02731), with the routing written by hand.

A PESC layer replaces a dense FFN. Every expert is the *same* frozen FFN followed by its own
bottleneck adapter, so the FFN runs once per token and only the adapters are mixed:

    h = LN(x)                                   the FFN input; the router reads it too
    u = FFN(h)                                  shared, frozen, once per token
    g = softmax(topk(W_r h, k))                 Eq. 9: softmax over the k kept logits
    y = sum_{i in topk} g_i A_i(u)              A_i(u) = u + s W_up_i GELU(W_down_i u)  (Eq. 6-8)
      = u + sum_{i in topk} g_i s W_up_i GELU(W_down_i u)     because the g_i sum to 1

With W_up_i = 0 at init, y = u: the upcycled model computes the dense model's function exactly.
Load balancing (Eq. 10, Switch Transformer): L_aux = alpha * E * sum_i f_i P_i, with f_i the share of
(token, slot) assignments that go to expert i and P_i the mean router probability of expert i.

The adapters can be mixed in two ways, chosen by `dispatch` (they compute the same numbers):
  "loop"   - for each expert that was hit, gather its tokens, run its adapter, scatter-add back
             (Mixtral style; easy to read, but one host sync and several small launches per expert);
  "dense"  - stack every W_down into one (E*r, d) matrix: one matmul for all experts, GELU, multiply
             each expert's r-block by its gate (zero when not selected), one matmul with the stacked
             W_up. No syncs, a handful of launches; on a GPU the fused kernels in kernels.cu replace
             the routing and the gate-GELU-mask step (see the end of this file).
SparseUpcycledMoE is the sparse-upcycling baseline (Komatsuzaki et al., 2022): E trainable copies
of the FFN behind the same router.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import Adapter


# -----------------------------------------------------------------------------
# routing

def route(router_logits, top_k):
    """router_logits (N, E) -> (weights (N, k) fp32, indices (N, k) int64,
    probs (N, E) fp32 full softmax, counts (E,) int64 assignments per expert).
    This is the PyTorch reference of the fused router kernel."""
    logits = router_logits.float()
    probs = F.softmax(logits, dim=-1)                            # P in Eq. 10
    top_logits, indices = torch.topk(logits, top_k, dim=-1)      # (N, k)
    weights = F.softmax(top_logits, dim=-1)                      # Eq. 9: softmax over the kept logits
    counts = torch.zeros(logits.size(-1), dtype=torch.long, device=logits.device)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones_like(indices.reshape(-1)))
    return weights, indices, probs, counts


class TopKRouter(nn.Module):
    """W_r: a bias-free Linear(d -> E), always evaluated in fp32 (bf16 logits would flip top-k
    choices between nearly tied experts). Optional multiplicative jitter on the router's own
    copy of the input, in training only; the experts never see it."""

    def __init__(self, d_model, n_experts, top_k, jitter=0.0):
        super().__init__()
        self.top_k = top_k
        self.jitter = jitter
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        # small random init: a zero router would tie every expert and send all tokens to experts 0..k-1
        nn.init.normal_(self.gate.weight, mean=0.0, std=0.02)

    def forward(self, h):
        """h (N, d) -> router logits (N, E), fp32."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(h, self.gate.weight.float())


def assignment_shares(indices, n_experts, token_mask=None):
    """f in Eq. 10: the share of (token, slot) assignments per expert, over real tokens only.
    Returns (f (E,) fp32 summing to 1, assignment counts (E,) fp32)."""
    ones = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
    if token_mask is not None:
        ones = ones * token_mask.reshape(-1, 1).float()
    counts = torch.zeros(n_experts, dtype=torch.float32, device=indices.device)
    counts.scatter_add_(0, indices.reshape(-1), ones.reshape(-1))
    return counts / counts.sum().clamp(min=1.0), counts


def balance_loss(probs, indices, token_mask=None):
    """Eq. 10 without alpha: E * sum_i f_i * P_i. f is a count and carries no gradient; the
    gradient reaches the router through P_i, pushing probability away from overloaded experts.
    (The official PESC code averaged the top-k *weights* instead, which makes this the constant E.)"""
    n_experts = probs.size(-1)
    f, _ = assignment_shares(indices, n_experts, token_mask)
    if token_mask is None:
        P = probs.mean(dim=0)
    else:  # a float mask instead of boolean indexing: no host sync
        m = token_mask.reshape(-1, 1).float()
        P = (probs * m).sum(dim=0) / m.sum().clamp(min=1.0)
    return n_experts * torch.sum(f * P)


def load_balancing_loss(router_logits, top_k, token_mask=None):
    """router_logits (N, E) -> scalar E * sum_i f_i P_i; exactly 1.0 for perfectly balanced routing.
    token_mask (N,) bool, False for padding tokens, which are left out."""
    probs = F.softmax(router_logits.float(), dim=-1)
    indices = torch.topk(router_logits, top_k, dim=-1).indices
    return balance_loss(probs, indices, token_mask)


def router_z_loss(router_logits, token_mask=None):
    """ST-MoE's z-loss: mean of logsumexp(logits)^2; keeps router logits small (off by default)."""
    z = torch.logsumexp(router_logits.float(), dim=-1) ** 2
    if token_mask is None:
        return z.mean()
    m = token_mask.reshape(-1).float()
    return (z * m).sum() / m.sum().clamp(min=1.0)


# -----------------------------------------------------------------------------
# mixing the adapter experts: two dispatch paths that compute the same numbers

def adapters_loop(u, experts, weights, indices):
    """sum_{i in topk} g_i delta_i(u), Mixtral style: run each expert only on the tokens routed to it."""
    out = torch.zeros_like(u)
    for e in indices.unique().tolist():                  # host sync: which experts were hit
        token, slot = torch.where(indices == e)          # the (token, slot) pairs routed to e
        delta = experts[e](u[token])                     # (n_e, d)
        out.index_add_(0, token, (weights[token, slot, None] * delta).to(out.dtype))
    return out


def expert_gates(indices, weights, n_experts):
    """Dense (N, E) gate matrix: g_i for the k selected experts, 0 for the rest."""
    gates = torch.zeros(indices.size(0), n_experts, dtype=weights.dtype, device=weights.device)
    return gates.scatter(1, indices, weights)


def gate_gelu_mask_reference(p, indices, weights, n_experts, scale):
    """The step between the two matmuls of the dense path: p (N, E*r) pre-activations ->
    s * g_e * GELU(p) in each selected expert's r-block, zeros elsewhere. This is the PyTorch
    reference of the fused gate-GELU-mask kernel."""
    N = p.size(0)
    gates = expert_gates(indices, weights, n_experts).to(p.dtype)        # (N, E)
    a = F.gelu(p).view(N, n_experts, -1) * gates[:, :, None]            # (N, E, r)
    return (scale * a).view(N, -1)


def adapters_dense_masked(u, experts, weights, indices, scale):
    """sum_{i in topk} g_i delta_i(u) with two matmuls over all experts at once."""
    n_experts = len(experts)
    w_down = torch.cat([e.down.weight for e in experts], dim=0)  # (E*r, d): all W_down stacked
    w_up = torch.cat([e.up.weight for e in experts], dim=1)      # (d, E*r): all W_up side by side
    p = F.linear(u, w_down)                                       # (N, E*r)
    a = gate_gelu_mask_reference(p, indices, weights, n_experts, scale)
    return F.linear(a, w_up)                                      # (N, d)


# -----------------------------------------------------------------------------
# the layers

def check_moe_sizes(n_experts, top_k):
    if not isinstance(n_experts, int) or n_experts <= 0:
        raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
    if not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if top_k > n_experts:
        raise ValueError(f"top_k ({top_k}) cannot exceed n_experts ({n_experts})")


class PESCMoE(nn.Module):
    """A PESC layer built around an existing FFN module (frozen here)."""

    def __init__(self, ffn, d_model, n_experts=8, top_k=2, adapter_dim=64, adapter_scale=1.0,
                 adapter_dropout=0.0, aux_loss_coef=0.01, z_loss_coef=0.0, router_jitter=0.0,
                 dispatch="dense"):
        super().__init__()
        check_moe_sizes(n_experts, top_k)
        if not isinstance(adapter_dim, int) or adapter_dim <= 0:
            raise ValueError(f"adapter_dim must be a positive int, got {adapter_dim!r}")
        if dispatch not in ("loop", "dense"):
            raise ValueError(f"dispatch must be 'loop' or 'dense', got {dispatch!r}")
        self.n_experts, self.top_k, self.scale = n_experts, top_k, adapter_scale
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.dispatch = dispatch
        self.ffn = ffn.requires_grad_(False)
        self.router = TopKRouter(d_model, n_experts, top_k, router_jitter)
        # the adapters' own dropout stays 0: one dropout on u, shared by both dispatch paths
        self.experts = nn.ModuleList([Adapter(d_model, adapter_dim, adapter_scale) for _ in range(n_experts)])
        self.adapter_dropout = nn.Dropout(adapter_dropout)
        self.last_counts = None    # (E,) assignments per expert in the last forward, for logging
        self.last_indices = None   # (N, k) the last forward's expert choices, for sample.py --show_experts

    def forward(self, h, token_mask=None):
        """h (B, T, d) -> (y (B, T, d), aux_loss scalar)."""
        shape = h.shape
        h = h.reshape(-1, shape[-1])                                    # (N, d)
        u = self.ffn(h)                                                 # (N, d), the shared expert body
        logits = self.router(h)                                         # (N, E) fp32
        weights, indices, probs, counts = route(logits, self.top_k)
        aux = aux_loss(self, logits, probs, indices, token_mask)
        u_in = self.adapter_dropout(u)
        if self.dispatch == "loop":
            delta = adapters_loop(u_in, self.experts, weights, indices)
        else:
            delta = adapters_dense_masked(u_in, self.experts, weights, indices, self.scale)
        record_routing(self, indices, counts, token_mask)
        return (u + delta).view(shape), aux


class SparseUpcycledMoE(nn.Module):
    """Sparse upcycling: E trainable copies of the FFN, mixed by the same top-k router.
    Function-preserving at step 0 too: every copy is the same FFN and the gates sum to 1."""

    def __init__(self, ffn, d_model, n_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.0,
                 router_jitter=0.0):
        super().__init__()
        check_moe_sizes(n_experts, top_k)
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = TopKRouter(d_model, n_experts, top_k, router_jitter)
        self.experts = nn.ModuleList([copy.deepcopy(ffn).requires_grad_(True) for _ in range(n_experts)])
        self.last_counts = None
        self.last_indices = None

    def forward(self, h, token_mask=None):
        shape = h.shape
        h = h.reshape(-1, shape[-1])                                    # (N, d)
        logits = self.router(h)                                         # (N, E) fp32
        weights, indices, probs, counts = route(logits, self.top_k)
        aux = aux_loss(self, logits, probs, indices, token_mask)
        y = adapters_loop(h, self.experts, weights, indices)            # the same loop, FFN experts
        record_routing(self, indices, counts, token_mask)
        return y.view(shape), aux


def aux_loss(layer, logits, probs, indices, token_mask):
    """alpha * Eq. 10 (+ the optional z-loss), over the real tokens."""
    mask = None if token_mask is None else token_mask.reshape(-1)
    aux = layer.aux_loss_coef * balance_loss(probs, indices, mask)
    if layer.z_loss_coef > 0:
        aux = aux + layer.z_loss_coef * router_z_loss(logits, mask)
    return aux


@torch.no_grad()
def record_routing(layer, indices, counts, token_mask):
    """Keeps the last forward's routing for logging; counts over real tokens only."""
    if token_mask is not None:
        counts = assignment_shares(indices, layer.n_experts, token_mask.reshape(-1))[1].long()
    layer.last_counts = counts.detach()
    layer.last_indices = indices.detach()
