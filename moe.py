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
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from adapters import Adapter


# -----------------------------------------------------------------------------
# routing

def at_least_fp32(x):
    """Routing math runs in fp32 (bf16 would flip near-tied top-k choices), or in fp64 when given fp64
    (the float64 gradchecks and references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def assignment_counts(indices, n_experts, token_mask=None):
    """(E,) int64: how many (token, slot) assignments each expert got, over real tokens only
    (token_mask (N,) bool, False for padding). route() counts without a mask."""
    ones = torch.ones_like(indices)
    if token_mask is not None:
        ones = ones * token_mask.reshape(-1, 1).long()
    counts = torch.zeros(n_experts, dtype=torch.long, device=indices.device)
    return counts.scatter_add_(0, indices.reshape(-1), ones.reshape(-1))


def route(router_logits, top_k):
    """router_logits (N, E) -> (weights (N, k) fp32, indices (N, k) int64,
    probs (N, E) fp32 full softmax, counts (E,) int64 assignments per expert).
    This is the PyTorch reference of the fused router kernel."""
    logits = at_least_fp32(router_logits)
    probs = F.softmax(logits, dim=-1)                            # P in Eq. 10
    top_logits, indices = torch.topk(logits, top_k, dim=-1)      # (N, k)
    weights = F.softmax(top_logits, dim=-1)                      # Eq. 9: softmax over the kept logits
    return weights, indices, probs, assignment_counts(indices, logits.size(-1))


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
            h = at_least_fp32(h)
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(h, self.gate.weight.to(h.dtype))


def balance_loss(probs, counts, token_mask=None):
    """Eq. 10 without alpha: E * sum_i f_i * P_i, with f = counts / sum(counts) the share of
    assignments. f is a count and carries no gradient; the gradient reaches the router through P_i,
    pushing probability away from overloaded experts. (The official PESC code averaged the top-k
    *weights* instead, which makes this the constant E.)"""
    n_experts = probs.size(-1)
    f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
    if token_mask is None:
        P = probs.mean(dim=0)
    else:  # a float mask instead of boolean indexing: no host sync
        m = token_mask.reshape(-1, 1).to(probs.dtype)
        P = (probs * m).sum(dim=0) / m.sum().clamp(min=1.0)
    return n_experts * torch.sum(f * P)


def load_balancing_loss(router_logits, top_k, token_mask=None):
    """router_logits (N, E) -> scalar E * sum_i f_i P_i; exactly 1.0 for perfectly balanced routing.
    token_mask (N,) bool, False for padding tokens, which are left out."""
    probs = F.softmax(at_least_fp32(router_logits), dim=-1)
    indices = torch.topk(router_logits, top_k, dim=-1).indices
    return balance_loss(probs, assignment_counts(indices, probs.size(-1), token_mask), token_mask)


def router_z_loss(router_logits, token_mask=None):
    """ST-MoE's z-loss: mean of logsumexp(logits)^2; keeps router logits small (off by default)."""
    z = torch.logsumexp(at_least_fp32(router_logits), dim=-1) ** 2
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
    gates = (scale * expert_gates(indices, weights, n_experts)).to(p.dtype)  # (N, E): s folded in, one op fewer on (N, E*r)
    a = F.gelu(p).view(N, n_experts, -1) * gates[:, :, None]                # (N, E, r)
    return a.view(N, -1)


def adapters_dense_masked(u, experts, weights, indices, scale, fused=False):
    """sum_{i in topk} g_i delta_i(u) with two matmuls over all experts at once.
    fused=True does the step between them with the CUDA kernel (gate_gelu_mask_cuda)."""
    n_experts = len(experts)
    w_down = torch.cat([e.down.weight for e in experts], dim=0)  # (E*r, d): all W_down stacked
    w_up = torch.cat([e.up.weight for e in experts], dim=1)      # (d, E*r): all W_up side by side
    p = F.linear(u, w_down)                                       # (N, E*r)
    gate_gelu_mask = gate_gelu_mask_cuda if fused else gate_gelu_mask_reference
    a = gate_gelu_mask(p, indices, weights, n_experts, scale)                 # (N, E*r)
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
        fused = self.dispatch == "dense" and use_kernels(h)              # the loop path stays PyTorch
        weights, indices, aux = route_with_aux_loss(self, logits, token_mask, fused)
        u_in = self.adapter_dropout(u)
        if self.dispatch == "loop":
            delta = adapters_loop(u_in, self.experts, weights, indices)
        else:
            delta = adapters_dense_masked(u_in, self.experts, weights, indices, self.scale, fused)
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
        weights, indices, aux = route_with_aux_loss(self, logits, token_mask)
        y = adapters_loop(h, self.experts, weights, indices)            # the same loop, FFN experts
        return y.view(shape), aux


def route_with_aux_loss(layer, logits, token_mask, fused=False):
    """The routing step both MoE layers share: Eq. 9 (route, or its fused kernel), then alpha * Eq. 10
    (+ the optional z-loss) over the real tokens, and the routing kept for logging (last_counts,
    last_indices). Returns (weights, indices, aux_loss)."""
    weights, indices, probs, counts = (route_cuda if fused else route)(logits, layer.top_k)
    mask = None if token_mask is None else token_mask.reshape(-1)
    if mask is not None:  # padding counts neither in Eq. 10 nor in the logged load
        counts = assignment_counts(indices, layer.n_experts, mask)
    aux = layer.aux_loss_coef * balance_loss(probs, counts, mask)
    if layer.z_loss_coef > 0:
        aux = aux + layer.z_loss_coef * router_z_loss(logits, mask)
    layer.last_counts, layer.last_indices = counts.detach(), indices.detach()
    return weights, indices, aux


# -----------------------------------------------------------------------------
# fused CUDA path: kernels.cu, compiled on the first forward of a dense PESCMoE on a GPU
#
# route_cuda and gate_gelu_mask_cuda compute what route and gate_gelu_mask_reference compute (the
# same indices and counts; values up to float rounding), forward and backward, one kernel launch each.
# PESCMoE uses them when use_kernels(h) says so: h on a GPU, USE_KERNELS on, kernels.cu built.
# Importing this file builds nothing; the build happens on the first such call, takes 1-2 minutes and
# is cached (by source hash) in build/kernels/. Only a failed build falls back (after printing the
# compiler's message); an error in a kernel at run time is never caught.

USE_KERNELS = True   # override: False makes PESCMoE use the PyTorch path on the GPU too (tests, bench)
KERNELS_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
KERNELS_BUILD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "kernels")
STALE_LOCK_SECONDS = 600   # a build takes 1-2 minutes: an older lock file was left by a killed build
_kernels = None      # the compiled extension module; False once its build failed
_said = set()        # the lines say_once() has printed


def say_once(line):
    if line not in _said:
        _said.add(line)
        print(line)


def clear_stale_lock(build_dir, stale_after=STALE_LOCK_SECONDS):
    """Older torch (a FileBaton in cpp_extension) holds build_dir/lock while it compiles, and every
    other load() waits until the file is gone: forever, if the build that made it was killed. The file
    holds no process id, so go by its age: while it is younger than a build can take, another process
    may really be building (the ranks of one job), so wait, saying which file to delete if none is;
    once older, remove it and say so."""
    lock = os.path.join(build_dir, "lock")
    while os.path.exists(lock):
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            break                                   # the other build just finished
        if age > stale_after:
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            print(f"moe: removed the stale build lock {lock} ({age / 60:.0f} min old, left by a killed build)")
            break
        say_once(f"moe: waiting for another build of kernels.cu (lock file {lock}); if no build is running, "
                 f"delete that file (it is removed once {stale_after:.0f} s old)")
        time.sleep(1.0)


def build_kernels():
    """Compiles kernels.cu into build/kernels/ (or loads the cached build) and returns the extension
    module; raises if the build fails. Needs nvcc and a CUDA-enabled torch, not a GPU (without one,
    set TORCH_CUDA_ARCH_LIST, e.g. 9.0 for H100/H200)."""
    # torch finds CUDA next to nvcc; where nvcc is a wrapper in /usr/local/bin that guess is /usr/local
    # and linking -lcudart fails, so point it at /usr/local/cuda unless the environment says otherwise.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension          # here, so that importing moe.py stays CUDA-free
    os.makedirs(KERNELS_BUILD_DIR, exist_ok=True)
    # newer torch locks with an OS-level file lock, which dies with its holder; the file itself stays
    # and means nothing. Only the older existence-based lock (FileBaton) can be left stale.
    if hasattr(cpp_extension, "FileBaton"):
        clear_stale_lock(KERNELS_BUILD_DIR)
    # -O3, and no --use_fast_math: GELU must be the exact erf form and exp/erf stay IEEE-accurate
    return cpp_extension.load(name="pesc_kernels", sources=[KERNELS_SOURCE], build_directory=KERNELS_BUILD_DIR,
                              extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False)


def kernels_available():
    """True when the fused kernels can run: a GPU is visible and kernels.cu built. The first call
    builds; a failed build prints the compiler's message once and gives False from then on."""
    global _kernels
    if not torch.cuda.is_available():
        return False
    if _kernels is None:
        try:
            _kernels = build_kernels()
        except Exception as err:   # only the build is guarded; kernel calls never are
            print(f"moe: kernels.cu failed to build, the PyTorch path will be used. The build said:\n{err}")
            _kernels = False
    return _kernels is not False


def use_kernels(x):
    """Whether the dense path runs the fused kernels for the tensor x, printing once which path runs.
    torch.compile traces the PyTorch path (its compiler fuses those ops itself)."""
    if torch.compiler.is_compiling() or not x.is_cuda:
        return False
    fused = USE_KERNELS and kernels_available()
    why = ("the fused CUDA kernels (kernels.cu)" if fused else
           "the PyTorch path (moe.USE_KERNELS is False)" if not USE_KERNELS else
           "the PyTorch path (kernels.cu is not available)")
    say_once(f"moe: the dense MoE path on CUDA runs {why}")
    return fused


def compiled_kernels():
    """The extension module, built if need be; raises if the kernels cannot run here."""
    if not kernels_available():
        raise RuntimeError("the fused MoE kernels need a GPU and a successful build of kernels.cu")
    return _kernels


class FusedRoute(torch.autograd.Function):
    """route() in one kernel: logits (N, E) fp32 -> weights, indices, probs, counts."""

    @staticmethod
    def forward(ctx, logits, top_k):
        weights, indices, probs, counts = compiled_kernels().route_forward(logits, top_k)
        ctx.save_for_backward(weights, indices, probs)
        ctx.mark_non_differentiable(indices, counts)
        return weights, indices, probs, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_indices, grad_probs, grad_counts):
        weights, indices, probs = ctx.saved_tensors
        # autograd may hand over expanded (stride 0) gradients; the kernel reads rows densely
        grad_logits = compiled_kernels().route_backward(grad_weights.contiguous(), grad_probs.contiguous(),
                                                        weights, indices, probs)
        return grad_logits, None


class FusedGateGeluMask(torch.autograd.Function):
    """gate_gelu_mask_reference() in one kernel; backward gives dp and d weights in one more."""

    @staticmethod
    def forward(ctx, p, indices, weights, n_experts, scale):
        ctx.save_for_backward(p, indices, weights)
        ctx.n_experts, ctx.scale = n_experts, scale
        return compiled_kernels().gate_gelu_mask_forward(p, indices, weights, n_experts, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a):
        p, indices, weights = ctx.saved_tensors
        grad_p, grad_weights = compiled_kernels().gate_gelu_mask_backward(
            grad_a.contiguous(), p, indices, weights, ctx.n_experts, ctx.scale)
        return grad_p, None, grad_weights, None, None


def route_cuda(router_logits, top_k):
    """route() on the GPU: router_logits (N, E) fp32 contiguous CUDA tensor; same four outputs."""
    return FusedRoute.apply(router_logits, top_k)


def gate_gelu_mask_cuda(p, indices, weights, n_experts, scale):
    """gate_gelu_mask_reference() on the GPU: p (N, E*r) fp32 or bf16, indices (N, k) int64,
    weights (N, k) fp32, all contiguous CUDA tensors. The k indices of a row must be distinct."""
    return FusedGateGeluMask.apply(p, indices, weights, n_experts, float(scale))


# the backward math the kernels implement, written out in PyTorch (the tests check it against autograd)

def route_backward_reference(grad_weights, grad_probs, weights, indices, probs):
    """d logits of route(). Both differentiable outputs are softmaxes of (part of) the row, and the
    softmax s = softmax(x) has dx = s * (ds - <ds, s>); the weights' part lands on the kept columns."""
    grad = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))             # (N, E)
    grad_kept = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdim=True))  # (N, k)
    return grad.scatter_add(1, indices, grad_kept)


def gate_gelu_mask_backward_reference(grad_a, p, indices, weights, n_experts, scale):
    """(d p, d weights) of gate_gelu_mask_reference(). With Phi the normal cdf and phi its density,
    GELU(x) = x Phi(x) and GELU'(x) = Phi(x) + x phi(x); a = s g GELU(p) in the selected blocks, so
    dp = s g GELU'(p) da there (0 elsewhere) and dg_e = s sum_r da GELU(p), a reduction over r."""
    N = p.size(0)
    x = p.view(N, n_experts, -1)                                          # (N, E, r)
    da = grad_a.view(N, n_experts, -1)
    cdf = 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    gates = expert_gates(indices, weights, n_experts).to(p.dtype)[:, :, None]   # (N, E, 1)
    grad_p = scale * gates * da * (cdf + x * pdf)
    grad_gates = scale * (da * x * cdf).sum(-1)                           # (N, E)
    return grad_p.view(N, -1), grad_gates.gather(1, indices).to(weights.dtype)
