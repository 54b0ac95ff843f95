"""
The Python side of kernels.cu: building it, checking that it runs on this GPU, and wrapping its
forward and backward ops in torch.autograd.Function so that moe.py can call them like PyTorch ops.

  route_cuda(logits, top_k)                              = moe.route(), one kernel each way
  gate_gelu_mask_cuda(p, indices, weights, E, scale)     = moe.gate_gelu_mask(), one kernel each way

moe.py uses them for dispatch="kernels" (what "auto" picks on a GPU) when usable(h, logits) says so:
a CUDA tensor, fp32 router logits, and a build of kernels.cu that compiled AND passed a one-time probe
on this GPU (a build for another architecture compiles fine and then fails at the first launch).
Importing this file builds nothing; the first such call compiles (1-2 minutes, cached by source
hash in build/kernels/). A failed build or probe prints its message once and the masked PyTorch
path runs instead; an error inside a kernel after the probe is never caught.

The backward formulas the kernels implement are written out here in PyTorch too
(route_backward_reference, gate_gelu_mask_backward_reference); tests/test_kernels.py checks them
against autograd on the CPU and the kernels against them on a GPU.

    python -m pytest tests/test_kernels.py -q -rs
"""

import math
import os
import time

import torch
from torch.autograd.function import once_differentiable

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
BUILD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "kernels")
STALE_LOCK_SECONDS = 600   # a build takes 1-2 minutes: an older lock file was left by a killed build
MAX_EXPERTS = 1024         # kernels.cu's limit (shared memory of the gate kernels without the >48 KB opt-in)
_module = None             # the compiled and probed extension; False once the build or the probe failed


# -----------------------------------------------------------------------------
# building

def clear_stale_lock(build_dir, stale_after=STALE_LOCK_SECONDS):
    """Older torch (a FileBaton in cpp_extension) holds build_dir/lock while it compiles, and every
    other load() waits until the file is gone: forever, if the build that made it was killed. The file
    holds no process id, so go by its age: while it is younger than a build can take, another process
    may really be building (the ranks of one job), so wait, saying which file to delete if none is;
    once older, remove it and say so."""
    from moe import say_once   # here: moe.py imports this file
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
            print(f"kernels: removed the stale build lock {lock} ({age / 60:.0f} min old, left by a killed build)")
            break
        say_once(f"kernels: waiting for another build of kernels.cu (lock file {lock}); if no build is running, "
                 f"delete that file (it is removed once {stale_after:.0f} s old)")
        time.sleep(1.0)


def point_at_cuda():
    """torch finds CUDA next to nvcc; where nvcc is a wrapper in /usr/local/bin that guess is /usr/local
    and linking -lcudart fails, so point it at /usr/local/cuda unless the environment says otherwise.
    Must run before torch.utils.cpp_extension is first imported: it reads CUDA_HOME once, on import."""
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def missing_toolchain():
    """Why kernels.cu cannot be built here, or None: a CPU-only torch, no nvcc, or no ninja."""
    import shutil
    point_at_cuda()
    if torch.version.cuda is None:
        return "this torch is built without CUDA"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) and shutil.which("nvcc") is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability
        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


def build():
    """Compiles kernels.cu into build/kernels/ (or loads the cached build) and returns the extension
    module; raises if the build fails. Needs nvcc, ninja and a CUDA-enabled torch, not a GPU (without
    one, set TORCH_CUDA_ARCH_LIST, e.g. 9.0 for H100/H200)."""
    why = missing_toolchain()
    if why:
        raise RuntimeError(f"kernels.cu cannot be built: {why}")
    from torch.utils import cpp_extension          # here, so that importing this file stays CUDA-free
    os.makedirs(BUILD_DIR, exist_ok=True)
    # newer torch locks with an OS-level file lock, which dies with its holder; only the older
    # existence-based lock (FileBaton) can be left stale.
    if hasattr(cpp_extension, "FileBaton"):
        clear_stale_lock(BUILD_DIR)
    # -O3, and no --use_fast_math: GELU must be the exact erf form and exp/erf stay IEEE-accurate
    return cpp_extension.load(name="pesc_kernels", sources=[SOURCE], build_directory=BUILD_DIR,
                              extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False)


def probe(module):
    """Runs both ops forward and backward once on a tiny input on the current GPU and compares them
    with the PyTorch references: a build for another architecture ("no kernel image is available")
    or a broken kernel fails here, once, instead of at the first training step."""
    from moe import gate_gelu_mask, route                  # here: moe.py imports this file
    g = torch.Generator().manual_seed(0)
    logits = (torch.arange(8.0).repeat(5, 1) + torch.rand(5, 8, generator=g)).cuda()   # clear top-k gaps
    weights, indices, probs, counts = module.route_forward(logits, 2)
    ref = route(logits, 2)
    if not (torch.equal(indices, ref[1]) and torch.equal(counts, ref[3])):
        raise RuntimeError("the router kernel picks other experts than moe.route()")
    if not (torch.allclose(weights, ref[0], atol=1e-5) and torch.allclose(probs, ref[2], atol=1e-5)):
        raise RuntimeError("the router kernel's weights differ from moe.route()'s")
    module.route_backward(torch.ones_like(weights), torch.ones_like(probs), weights, indices, probs)
    p = torch.randn(5, 8 * 4, generator=g).cuda()
    a = module.gate_gelu_mask_forward(p, indices, weights, 8, 0.5)
    if not torch.allclose(a, gate_gelu_mask(p, indices, weights, 8, 0.5), atol=1e-5):
        raise RuntimeError("the gate-GELU-mask kernel's values differ from moe.gate_gelu_mask()'s")
    module.gate_gelu_mask_backward(torch.ones_like(a), p, indices, weights, 8, 0.5)
    torch.cuda.synchronize()


def available():
    """True when the fused kernels can run: a GPU is visible, kernels.cu built and passed the probe.
    The first call builds and probes; a failure prints why, once, and gives False from then on."""
    global _module
    if not torch.cuda.is_available():
        return False
    if _module is None:
        try:
            module = build()
        except Exception as err:   # the build is guarded (missing tools, compiler errors): fall back
            print(f"kernels: kernels.cu could not be built; the PyTorch path runs instead. The build said:\n{err}")
            _module = False
            return False
        try:
            probe(module)
            _module = module
        except Exception as err:   # e.g. built for another GPU architecture (TORCH_CUDA_ARCH_LIST)
            print(f"kernels: kernels.cu built but does not run correctly on {torch.cuda.get_device_name()} "
                  f"({type(err).__name__}: {str(err)[:300]}); the PyTorch path runs instead. If you set "
                  f"TORCH_CUDA_ARCH_LIST, include this GPU's architecture and delete {BUILD_DIR}.")
            _module = False
    return _module is not False


def usable(h, logits):
    """Whether this forward can use the kernels: h on a GPU, fp32 router logits (a float64 layer uses
    PyTorch), at most MAX_EXPERTS experts, and the extension available."""
    if not h.is_cuda or logits.dtype != torch.float32 or logits.size(-1) > MAX_EXPERTS:
        return False
    ok = available()
    if not ok:
        from moe import say_once   # here: moe.py imports this file
        say_once("kernels: the fused CUDA kernels are not available; dispatch='kernels' runs the masked path")
    return ok


def compiled():
    """The extension module, built if need be; raises if the kernels cannot run here."""
    if not available():
        raise RuntimeError("the fused MoE kernels need a GPU and a working build of kernels.cu")
    return _module


# -----------------------------------------------------------------------------
# the autograd wrappers

class FusedRoute(torch.autograd.Function):
    """moe.route() in one kernel: logits (N, E) fp32 -> weights, indices, probs, counts."""

    @staticmethod
    def forward(ctx, logits, top_k):
        weights, indices, probs, counts = compiled().route_forward(logits.contiguous(), top_k)
        ctx.save_for_backward(weights, indices, probs)
        ctx.mark_non_differentiable(indices, counts)
        return weights, indices, probs, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_indices, grad_probs, grad_counts):
        weights, indices, probs = ctx.saved_tensors
        # autograd may hand over expanded (stride 0) or absent gradients; the kernel reads rows densely
        grad_weights = torch.zeros_like(weights) if grad_weights is None else grad_weights.contiguous()
        grad_probs = torch.zeros_like(probs) if grad_probs is None else grad_probs.contiguous()
        return compiled().route_backward(grad_weights, grad_probs, weights, indices, probs), None


class FusedGateGeluMask(torch.autograd.Function):
    """moe.gate_gelu_mask() in one kernel; backward gives dp and d weights in one more."""

    @staticmethod
    def forward(ctx, p, indices, weights, n_experts, scale):
        ctx.save_for_backward(p, indices, weights)
        ctx.n_experts, ctx.scale = n_experts, scale
        return compiled().gate_gelu_mask_forward(p, indices, weights, n_experts, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a):
        p, indices, weights = ctx.saved_tensors
        grad_p, grad_weights = compiled().gate_gelu_mask_backward(
            grad_a.contiguous(), p, indices, weights, ctx.n_experts, ctx.scale)
        return grad_p, None, grad_weights, None, None


def route_cuda(router_logits, top_k):
    """moe.route() on the GPU: router_logits (N, E) fp32 CUDA tensor; the same four outputs."""
    return FusedRoute.apply(router_logits, top_k)


def gate_gelu_mask_cuda(p, indices, weights, n_experts, scale):
    """moe.gate_gelu_mask() on the GPU: p (N, E*r) fp32 / bf16 / fp16, indices (N, k) int64,
    weights (N, k) fp32, all contiguous CUDA tensors. The k indices of a row must be distinct."""
    return FusedGateGeluMask.apply(p.contiguous(), indices.contiguous(), weights.contiguous(), n_experts, float(scale))


# -----------------------------------------------------------------------------
# the backward math the kernels implement, written out in PyTorch

def route_backward_reference(grad_weights, grad_probs, weights, indices, probs):
    """d logits of route(). Both differentiable outputs are softmaxes of (part of) the row, and the
    softmax s = softmax(x) has dx = s * (ds - <ds, s>); the weights' part lands on the kept columns."""
    grad = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))             # (N, E)
    grad_kept = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdim=True))  # (N, k)
    return grad.scatter_add(1, indices, grad_kept)


def gate_gelu_mask_backward_reference(grad_a, p, indices, weights, n_experts, scale):
    """(d p, d weights) of moe.gate_gelu_mask(). With Phi the normal cdf and phi its density,
    GELU(x) = x Phi(x) and GELU'(x) = Phi(x) + x phi(x); a = s g GELU(p) in the selected blocks, so
    dp = s g GELU'(p) da there (0 elsewhere) and dg_e = s sum_r da GELU(p), a reduction over r."""
    N = p.size(0)
    x = p.view(N, n_experts, -1)                                          # (N, E, r)
    da = grad_a.view(N, n_experts, -1)
    cdf = 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    from moe import expert_gates                                          # here: moe.py imports this file
    gates = expert_gates(indices, weights, n_experts).to(p.dtype)[:, :, None]   # (N, E, 1)
    grad_p = scale * gates * da * (cdf + x * pdf)
    grad_gates = scale * (da * x * cdf).sum(-1)                           # (N, E)
    return grad_p.view(N, -1), grad_gates.gather(1, indices).to(weights.dtype)
