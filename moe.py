"""
Mixture-of-Experts layers for PESC (Wu et al., 2024, arXiv 2401.02731), with the routing written by hand.

A PESC layer replaces a dense FFN. Every expert is the *same* frozen FFN followed by its own
bottleneck adapter, so the FFN runs once per token and only the adapters are mixed:

    h   = LN(x)                                  the FFN input; the router reads it too
    u   = FFN(h)                                 shared, frozen, once per token
    g   = softmax(topk(W_r h, k))                Eq. 9: softmax over the k kept logits
    y   = sum_{i in topk} g_i A_i(u)             A_i(u) = u + s W_up_i GELU(W_down_i u), the adapter expert
        = u + sum_{i in topk} g_i s W_up_i GELU(W_down_i u)       because the g_i sum to 1

With W_up_i = 0 at init, y = u: the upcycled model computes the dense model's function exactly.
Load balancing (Eq. 10, Switch Transformer): L_aux = alpha * E * sum_i f_i P_i, with f_i the share of
(token, slot) assignments that go to expert i and P_i the mean router probability of expert i.
(Equation numbers here and everywhere in the repo are the paper's: Eq. 9 the gate, Eq. 10 the loss.)

The experts' weights are stored stacked, one tensor per layer: w_down (E, r, d) holds every W_down_i
and w_up (E, r, d) every W_up_i transposed, so that both also read as one (E*r, d) matrix without a
copy. The adapter sum has three implementations, chosen by `dispatch`; they compute the same numbers,
and give every expert a gradient tensor (zero for an expert no token picked), so they also train alike:
  "loop"     for each expert that was hit, gather its tokens, run its adapter, index_add back
             (Mixtral style, as the official code; one host sync and a few launches per expert);
  "masked"   every expert on every token: one matmul with all W_down, GELU times each expert's gate
             (zero when not picked), one matmul with all W_up. No syncs, but E*r columns for every
             token where only k*r are needed. On a GPU, "kernels" is this path with the routing and
             the gate-GELU-mask step fused into the CUDA kernels of kernels.cu (kernels.py);
  "grouped"  the (token, slot) pairs sorted by expert, then two grouped matmuls over contiguous row
             groups (torch.nn.functional.grouped_mm): only the k chosen adapters' FLOPs, no loop.
  "auto"     choose_dispatch() picks one from the device and the shapes.
SparseUpcycledMoE is the sparse-upcycling baseline (Komatsuzaki et al., 2022): E trainable copies
of the FFN behind the same router, mixed by the loop.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from adapters import Adapter

DISPATCHES = ("auto", "loop", "masked", "grouped", "kernels")
RENAMED_DISPATCH = {"dense": "masked"}   # the spelling before the masked path got its own name


# -----------------------------------------------------------------------------
# routing: the router's logits, Eq. 9, Eq. 10

def at_least_fp32(x):
    """Routing math runs in fp32 (bf16 would flip near-tied top-k choices), or in fp64 when given fp64
    (the float64 gradchecks and references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Router(nn.Module):
    """W_r: a bias-free Linear(d -> E) giving one logit per expert, always evaluated in fp32 (bf16
    logits would flip top-k choices between nearly tied experts). route() does the top-k.
    Optional multiplicative jitter on the router's own copy of the input, in training only: the
    experts never see it (Hugging Face's Mixtral once jittered the hidden states in place)."""

    def __init__(self, d_model, n_experts, jitter=0.0, device=None, dtype=None):
        super().__init__()
        self.jitter = jitter
        # nn.Linear's kaiming-uniform init, as the official code
        self.gate = nn.Linear(d_model, n_experts, bias=False, device=device, dtype=dtype)

    def forward(self, h):
        """h (N, d) -> router logits (N, E), fp32."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = at_least_fp32(h)
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(h, self.gate.weight.to(h.dtype))


def assignment_counts(indices, n_experts, token_mask=None):
    """(E,) int64: how many (token, slot) assignments each expert got, over real tokens only
    (token_mask (N,) bool, False for padding)."""
    ones = torch.ones_like(indices)
    if token_mask is not None:
        ones = ones * token_mask.reshape(-1, 1).long()
    counts = torch.zeros(n_experts, dtype=torch.long, device=indices.device)
    return counts.scatter_add_(0, indices.reshape(-1), ones.reshape(-1))


def route(router_logits, top_k):
    """Eq. 9. router_logits (N, E) -> weights (N, k) fp32 (the gates g), indices (N, k) int64,
    probs (N, E) fp32 (the full softmax, P in Eq. 10), counts (E,) int64 assignments per expert.
    This is the PyTorch reference of the fused router kernel."""
    logits = at_least_fp32(router_logits)
    probs = F.softmax(logits, dim=-1)
    # a stable sort rather than topk: ties go to the lower expert index, as in the fused kernel
    top_logits, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    top_logits, indices = top_logits[:, :top_k], indices[:, :top_k]   # (N, k)
    weights = F.softmax(top_logits, dim=-1)                      # softmax over the kept logits only
    return weights, indices, probs, assignment_counts(indices, logits.size(-1))


def load_balancing_loss(probs, counts, token_mask=None):
    """Eq. 10 without alpha: E * sum_i f_i * P_i, with f = counts / sum(counts) the share of
    assignments and P_i the mean of probs[:, i] over real tokens; exactly 1 for balanced routing.
    f is a count and carries no gradient: the gradient reaches the router through P, pushing
    probability away from overloaded experts. (The official PESC code averaged the top-k *weights*
    instead, which makes this the constant E.)"""
    n_experts = probs.size(-1)
    f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
    if token_mask is None:
        P = probs.mean(dim=0)
    else:  # a float mask instead of boolean indexing: no host sync
        m = token_mask.reshape(-1, 1).to(probs.dtype)
        P = (probs * m).sum(dim=0) / m.sum().clamp(min=1.0)
    return n_experts * torch.sum(f * P)


def router_z_loss(router_logits, token_mask=None):
    """ST-MoE's z-loss: mean over real tokens of logsumexp(logits)^2; keeps router logits small (off by default)."""
    z = torch.logsumexp(at_least_fp32(router_logits), dim=-1) ** 2
    if token_mask is None:
        return z.mean()
    m = token_mask.reshape(-1).to(z.dtype)
    return (z * m).sum() / m.sum().clamp(min=1.0)


def route_and_balance(layer, logits, token_mask, fused=False):
    """The routing step both MoE layers share: Eq. 9 (route, or its fused kernel), then the layer's
    aux loss alpha * Eq. 10 (+ the optional z-loss) over the real tokens. Returns (weights, indices,
    counts over all tokens (what the dispatch computes), routing) with routing = (aux_loss, counts over
    real tokens, indices): what the layer reports to GPT.forward (see model.py, Routing)."""
    weights, indices, probs, counts = (kernels.route_cuda if fused else route)(logits, layer.top_k)
    mask = None if token_mask is None else token_mask.reshape(-1)
    real_counts = counts if mask is None else assignment_counts(indices, layer.n_experts, mask)
    aux = layer.aux_loss_coef * load_balancing_loss(probs, real_counts, mask)
    if layer.z_loss_coef > 0:
        aux = aux + layer.z_loss_coef * router_z_loss(logits, mask)
    return weights, indices, counts, (aux, real_counts.detach(), indices.detach())


# -----------------------------------------------------------------------------
# the adapter sum, three ways: sum_{(n, j)} gates[n, j] * W_up_e GELU(W_down_e u[n]), e = indices[n, j]
# (gates = s * the Eq. 9 weights; s is folded in once, on the (N, k) gates)

def loop_over_experts(x, gates, indices, expert):
    """Mixtral style: run each expert that was hit only on the tokens routed to it and add its gated
    output back, out[n] = sum_j gates[n, j] * expert(e, x[n]) with e = indices[n, j]. x (N, d),
    gates and indices (N, k); expert(e, rows) -> that expert's output for the rows."""
    out = torch.zeros_like(x)
    for e in indices.unique().tolist():                      # host sync: which experts were hit
        token, slot = torch.where(indices == e)              # the (token, slot) pairs routed to e
        out.index_add_(0, token, (gates[token, slot, None] * expert(e, x.index_select(0, token))).to(out.dtype))
    return out


def adapters_loop(u, w_down, w_up, gates, indices, dropout):
    """The adapters through loop_over_experts. u (N, d), w_down and w_up (E, r, d). Dropout on each
    gathered row: per (token, slot)."""
    return loop_over_experts(u, gates, indices, lambda e, x: F.gelu(dropout(x) @ w_down[e].t()) @ w_up[e])


def expert_gates(indices, weights, n_experts):
    """(N, k) router weights -> dense (N, E) gates: the weight for each selected expert, 0 elsewhere."""
    zeros = torch.zeros(indices.size(0), n_experts, dtype=weights.dtype, device=weights.device)
    return zeros.scatter(1, indices, weights)


def gate_gelu_mask(p, indices, weights, n_experts, scale):
    """The step between the two matmuls of the masked path: pre-activations p (N, E*r) ->
    s * g_e * GELU(p) in each selected expert's r-block, zeros elsewhere. This is the PyTorch
    reference of the fused gate-GELU-mask kernel."""
    N = p.size(0)
    gates = (scale * expert_gates(indices, weights, n_experts)).to(p.dtype)    # (N, E), zero where not picked
    return (F.gelu(p).view(N, n_experts, -1) * gates[:, :, None]).view(N, -1)  # (N, E, r) -> (N, E*r)


def adapters_masked(u, w_down, w_up, weights, indices, scale, dropout, fused=False):
    """Every expert on every token, then the gates mask out the ones not picked. Dropout on u: one
    mask per token, shared by its k experts. fused=True runs the gate step as the CUDA kernel."""
    E, r, d = w_down.shape
    p = F.linear(dropout(u), w_down.view(E * r, d))                 # (N, E*r): all pre-activations at once
    mask_step = kernels.gate_gelu_mask_cuda if fused else gate_gelu_mask
    a = mask_step(p, indices, weights, E, scale)                    # (N, E*r)
    return a @ w_up.view(E * r, d)                                  # (N, d)


def adapters_grouped(u, w_down, w_up, gates, indices, counts, dropout):
    """Only the chosen adapters: sort the N*k (token, slot) pairs by expert, so that each expert's
    rows are contiguous, and multiply each group by its own expert's matrices with grouped_mm.
    counts (E,): rows per expert over all N tokens (from the router, on the device: no host sync)."""
    N, k = indices.shape
    order = indices.reshape(-1).argsort(stable=True)                  # (N*k,): pairs grouped by expert
    token = order // k                                                # the token of each sorted pair
    # index_select rather than u[token]: its backward is an index_add, which the CPU runs ~25 % faster
    # than the accumulating index_put of advanced indexing
    x = dropout(u.index_select(0, token))                             # (N*k, d): dropout per (token, slot)
    ends = counts.cumsum(0).to(torch.int32)                           # (E,): where each expert's rows end
    dtype = compute_dtype(x)
    x, wd, wu = x.to(dtype), w_down.to(dtype), w_up.to(dtype)         # grouped_mm wants one dtype (bf16 on CUDA)
    hidden = F.gelu(F.grouped_mm(x, wd.transpose(1, 2), offs=ends))   # (N*k, r): x_row @ W_down_e^T
    y = F.grouped_mm(hidden, wu, offs=ends)                           # (N*k, d): hidden_row @ W_up_e^T
    y = y * gates.reshape(-1)[order, None].to(y.dtype)                # gate each pair
    return torch.zeros_like(u).index_add_(0, token, y.to(u.dtype))    # (N, d): each token sums its k pairs


# -----------------------------------------------------------------------------
# which path runs

GROUPED_MIN_RATIO = 2.0   # grouped beats masked on the CPU when E/k is above this (bench.py's layer table, README)


def compute_dtype(x):
    """The dtype a matmul on x computes in: the autocast dtype when autocast is on, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def grouped_mm_works(device, dtype):
    """Whether this torch has grouped_mm and it takes this device and dtype (torch >= 2.9; its
    documentation promises bf16 on CUDA with SM >= 80). Tried once per (device type, dtype), on a tiny input."""
    key = (device.type, dtype)
    if key not in _grouped_ok:
        ok = hasattr(F, "grouped_mm")
        if ok:
            try:
                x = torch.zeros(4, 8, device=device, dtype=dtype)
                F.grouped_mm(x, torch.zeros(2, 8, 8, device=device, dtype=dtype),
                             offs=torch.tensor([2, 4], device=device, dtype=torch.int32))
            except (RuntimeError, NotImplementedError):
                ok = False
        _grouped_ok[key] = ok
    return _grouped_ok[key]


_grouped_ok = {}
_said = set()


def say_once(line):
    if line not in _said:
        _said.add(line)
        print(line)


def choose_dispatch(device, n_experts, top_k, n_tokens):
    """dispatch="auto": the rule, from the measurements in the README. With k = E (one expert, the
    one-adapter baseline) every expert is used, so the masked path wastes nothing and is plain
    matmuls. On a GPU the fused kernels avoid the host sync and the launches per expert: on an
    H200 (E=8, d=256, r=64, N 128..32768) they ran 1.1-1.3x faster than masked, masked 1.4-3.6x
    faster than loop, grouped 0.77-0.95x masked (sizes where launches dominate). On a CPU the
    grouped path costs ~2x a plain matmul per row and saves E/k of the masked path's rows: it wins
    once E/k > GROUPED_MIN_RATIO and there are enough rows to amortise its sort (a few hundred).
    (The choice also decides how adapter dropout is drawn: per (token, slot) on the grouped and
    loop paths, per token on the masked and kernel paths.)"""
    if top_k == n_experts:
        return "masked"
    if device.type == "cuda":
        return "kernels"
    if n_experts / top_k > GROUPED_MIN_RATIO and n_tokens * top_k >= 256:
        return "grouped"
    return "masked"


def resolve_dispatch(wanted, h, logits, n_experts, top_k, r):
    """The path this forward runs: `wanted`, or the auto choice, with one printed line when a path
    cannot run here and another is used instead."""
    path = choose_dispatch(h.device, n_experts, top_k, h.size(0)) if wanted == "auto" else wanted
    compiling = torch.compiler.is_compiling()   # no probes and no printing inside a traced graph
    if path == "kernels" and (compiling or not kernels.usable(h, logits)):
        path = "masked"                         # (torch.compile fuses the masked path's ops itself)
    if path == "grouped":
        dtype = compute_dtype(h)
        aligned = all(size * dtype.itemsize % 16 == 0 for size in (r, h.size(1)))
        if compiling:
            return "grouped" if hasattr(F, "grouped_mm") and aligned else "masked"
        if not grouped_mm_works(h.device, dtype):
            say_once(f"moe: grouped_mm is missing or refuses {h.device.type}/{dtype} in torch {torch.__version__}; "
                     f"the masked path runs instead")
            path = "masked"
        elif not aligned:
            say_once(f"moe: grouped_mm needs rows of a multiple of 16 bytes; r={r}, d={h.size(1)} in {dtype} are not: "
                     f"the masked path runs instead")
            path = "masked"
    if not compiling:
        say_once(f"moe: dispatch={wanted} runs the {path} path on {h.device.type}")
    return path


def check_dispatch(dispatch):
    if dispatch in RENAMED_DISPATCH:
        raise ValueError(f"dispatch={dispatch!r} was renamed: use dispatch={RENAMED_DISPATCH[dispatch]!r}")
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")


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
    """A PESC layer built around an existing FFN module (frozen here): E adapter experts, top-k router."""

    def __init__(self, ffn, d_model, *, n_experts=8, top_k=2, adapter_dim=64, adapter_scale=1.0,
                 adapter_dropout=0.0, aux_loss_coef=0.01, z_loss_coef=0.0, router_jitter=0.0, dispatch="auto",
                 device=None, dtype=None):
        super().__init__()
        check_moe_sizes(n_experts, top_k)
        if not isinstance(adapter_dim, int) or adapter_dim <= 0:
            raise ValueError(f"adapter_dim must be a positive int, got {adapter_dim!r}")
        check_dispatch(dispatch)
        self.n_experts, self.top_k, self.scale = n_experts, top_k, adapter_scale
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.dispatch = dispatch
        self.ffn = ffn.requires_grad_(False)
        self.router = Router(d_model, n_experts, router_jitter, device, dtype)
        # every expert i: W_down_i (r, d) as in nn.Linear(d, r), and W_up_i^T (r, d); see the top of the file
        self.w_down = nn.Parameter(torch.empty(n_experts, adapter_dim, d_model, device=device, dtype=dtype))
        self.w_up = nn.Parameter(torch.zeros(n_experts, adapter_dim, d_model, device=device, dtype=dtype))  # A_i(u) = u
        for w in self.w_down:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))      # nn.Linear's default, as adapters.Adapter
        # dropout before W_down inside each expert (the official recipe uses p = 0.1): per (token, slot)
        # in the loop and grouped paths, one mask per token shared by its k experts in the masked path
        self.dropout = nn.Dropout(adapter_dropout)

    def forward(self, h, token_mask=None):
        """h (..., d) -> (y (..., d), routing (aux_loss, counts, indices)). Inside a GPT, h is (N_real, d):
        the model has dropped the padding already (model.py, Unpadded). Called on a padded batch on its
        own, a layer takes token_mask (h's leading shape, bool, False on padding) to keep the padding
        out of the aux loss and the counts."""
        shape = h.shape
        h = h.reshape(-1, shape[-1])                                     # (N, d)
        u = self.ffn(h)                                                  # (N, d): the shared expert body
        logits = self.router(h)                                          # (N, E) fp32
        path = resolve_dispatch(self.dispatch, h, logits, self.n_experts, self.top_k, self.w_down.size(1))
        weights, indices, counts, routing = route_and_balance(self, logits, token_mask, fused=path == "kernels")
        if path == "loop":
            delta = adapters_loop(u, self.w_down, self.w_up, self.scale * weights, indices, self.dropout)
        elif path == "grouped":
            delta = adapters_grouped(u, self.w_down, self.w_up, self.scale * weights, indices, counts, self.dropout)
        else:
            delta = adapters_masked(u, self.w_down, self.w_up, weights, indices, self.scale, self.dropout,
                                    fused=path == "kernels")
        return (u + delta).view(shape), routing

    def expert(self, i):
        """Expert i's adapter as an adapters.Adapter (a copy), for reading and testing."""
        r, d = self.w_down.shape[1:]
        adapter = Adapter(d, r, scale=self.scale)
        with torch.no_grad():
            adapter.down.weight.copy_(self.w_down[i])
            adapter.up.weight.copy_(self.w_up[i].t())
        return adapter

    def params_per_expert(self):
        return self.w_down[0].numel() + self.w_up[0].numel()


class SparseUpcycledMoE(nn.Module):
    """Sparse upcycling: E trainable copies of the FFN, mixed by the same top-k router.
    Function-preserving at step 0 too: every copy is the same FFN and the gates sum to 1."""

    def __init__(self, ffn, d_model, *, n_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.0, router_jitter=0.0,
                 device=None, dtype=None):
        super().__init__()
        check_moe_sizes(n_experts, top_k)
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = Router(d_model, n_experts, router_jitter, device, dtype)
        self.experts = nn.ModuleList([copy.deepcopy(ffn).requires_grad_(True) for _ in range(n_experts)])

    def forward(self, h, token_mask=None):
        shape = h.shape
        h = h.reshape(-1, shape[-1])                                     # (N, d)
        logits = self.router(h)                                          # (N, E) fp32
        weights, indices, _, routing = route_and_balance(self, logits, token_mask)
        y = loop_over_experts(h, weights, indices, lambda e, x: self.experts[e](x))
        return y.view(shape), routing

    def params_per_expert(self):
        return sum(p.numel() for p in self.experts[0].parameters())
