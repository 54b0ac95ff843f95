"""
Tests for the fused CUDA path: kernels.cu and its Python side, kernels.py.

    export CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0   # only needed where no GPU is visible
    python -m pytest tests/test_kernels.py -q -rs

Three tiers, each skipped with its reason where it cannot run:
  - always (CPU): the PyTorch references of both ops and the backward formulas the kernels implement
    (route_backward_reference, gate_gelu_mask_backward_reference) against autograd and gradcheck in
    float64; importing and running moe.py on the CPU builds nothing; the fallbacks (failed build,
    failed probe, float64 layers, too many experts, a missing toolchain) and the limits kernels.cu checks;
  - where nvcc, ninja and a CUDA-enabled torch are present (no GPU needed): kernels.cu compiles, once
    per session, and the module exposes every forward and backward op;
  - on a GPU: each kernel against a float64 CPU reference (fp32 atol 1e-5 / rtol 1e-4, gradients by
    norm-relative error < 1e-5, bf16 rtol 2e-2 / atol 1e-2), exact indices and counts, ties to the lower
    index, bitwise determinism, a PESCMoE training step with and without kernels, argument checks.
"""

import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import kernels as kernels_module
import moe
from kernels import gate_gelu_mask_backward_reference, gate_gelu_mask_cuda, route_backward_reference, route_cuda
from moe import PESCMoE, route
from moe import gate_gelu_mask as gate_gelu_mask_reference


def expert_gates(indices, weights, n_experts):
    """Dense (N, E) gates: g for the k selected experts, 0 for the rest."""
    return torch.zeros(indices.size(0), n_experts, dtype=weights.dtype).scatter(1, indices.cpu(), weights.cpu())

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("route_forward", "route_backward", "gate_gelu_mask_forward", "gate_gelu_mask_backward")


def rel_err(a, b):
    """norm-relative error of a against the reference b"""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def assert_close(out, ref, atol, rtol):
    """|ref - out| <= atol + rtol * |ref| elementwise, as in llm.c's checks"""
    out, ref = out.double().cpu(), ref.double().cpu()
    bad = (out - ref).abs() > atol + rtol * ref.abs()
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off; max |diff| {(out - ref).abs().max():.3g}"


# -----------------------------------------------------------------------------
# float64 versions of the two ops, forward = the PyTorch reference, backward = the formula the
# CUDA kernel implements. gradcheck on these checks that formula; the GPU tests compare with them.

class RouteReference(torch.autograd.Function):
    """route() with the backward written out (route_backward_reference), for gradcheck."""

    @staticmethod
    def forward(ctx, logits, top_k):
        probs = F.softmax(logits, dim=-1)
        top, indices = torch.topk(logits, top_k, dim=-1)
        weights = F.softmax(top, dim=-1)
        ctx.save_for_backward(weights, indices, probs)
        ctx.mark_non_differentiable(indices)
        return weights, indices, probs

    @staticmethod
    def backward(ctx, grad_weights, grad_indices, grad_probs):
        weights, indices, probs = ctx.saved_tensors
        return route_backward_reference(grad_weights, grad_probs, weights, indices, probs), None


class GateGeluMaskReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, indices, weights, n_experts, scale):
        ctx.save_for_backward(p, indices, weights)
        ctx.n_experts, ctx.scale = n_experts, scale
        return gate_gelu_mask_reference(p, indices, weights, n_experts, scale)

    @staticmethod
    def backward(ctx, grad_a):
        p, indices, weights = ctx.saved_tensors
        grad_p, grad_w = gate_gelu_mask_backward_reference(grad_a, p, indices, weights, ctx.n_experts, ctx.scale)
        return grad_p, None, grad_w, None, None


def gapped_logits(N, E, seed, gap=0.1):
    """Router logits with no near-ties: each row a shuffled ladder of values `gap` apart, shifted and
    scaled at random, so every top-k choice is unambiguous even in fp32."""
    g = torch.Generator().manual_seed(seed)
    ladder = torch.stack([torch.randperm(E, generator=g) for _ in range(N)]).float() * gap   # (N, E)
    scale = 1.0 + torch.rand(N, 1, generator=g)
    shift = torch.randn(N, 1, generator=g)
    return ladder * scale + shift


def random_routing(N, E, k, seed, dtype=torch.float32):
    """k distinct experts per token and softmax weights, as the router gives."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(N, E, generator=g).argsort(dim=-1)[:, :k].contiguous()
    weights = F.softmax(torch.randn(N, k, generator=g), dim=-1).to(dtype)
    return indices, weights


# -----------------------------------------------------------------------------
# always: the references (CPU)

@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (16, 4), (1, 1)])
def test_route_backward_reference_matches_autograd(E, k):
    logits = gapped_logits(13, E, seed=E + k).requires_grad_(True)
    weights, indices, probs, counts = route(logits, k)
    gw, gp = torch.randn_like(weights), torch.randn_like(probs)
    (grad_autograd,) = torch.autograd.grad((weights * gw).sum() + (probs * gp).sum(), logits)
    grad_formula = route_backward_reference(gw, gp, weights.detach(), indices, probs.detach())
    assert rel_err(grad_formula, grad_autograd) < 1e-6
    # the float64 mirror used below computes what route() computes
    w64, i64, p64 = RouteReference.apply(logits.detach().double(), k)
    assert torch.equal(i64, indices)
    assert_close(weights.detach(), w64, 1e-6, 1e-5)
    assert_close(probs.detach(), p64, 1e-6, 1e-5)
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=E))


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 2), (8, 4)])
def test_route_reference_gradcheck_float64(E, k):
    logits = gapped_logits(5, E, seed=k).double().requires_grad_(True)
    weights_and_probs = lambda x: RouteReference.apply(x, k)[0::2]   # gradcheck wants float outputs only
    assert torch.autograd.gradcheck(weights_and_probs, (logits,))


@pytest.mark.parametrize("E,k,r", [(4, 1, 3), (4, 2, 5), (8, 4, 2)])
def test_gate_gelu_mask_reference_gradcheck_float64(E, k, r):
    N = 6
    p = (2 * torch.randn(N, E * r, dtype=torch.float64)).requires_grad_(True)
    indices, weights = random_routing(N, E, k, seed=r, dtype=torch.float64)
    weights.requires_grad_(True)
    scale = 0.5
    # the reference through autograd, and the hand-written backward the kernel implements
    assert torch.autograd.gradcheck(lambda p, w: gate_gelu_mask_reference(p, indices, w, E, scale), (p, weights))
    assert torch.autograd.gradcheck(lambda p, w: GateGeluMaskReference.apply(p, indices, w, E, scale), (p, weights))
    # the two backwards agree to float64 rounding
    a = gate_gelu_mask_reference(p, indices, weights, E, scale)
    grad_a = torch.randn_like(a)
    dp, dw = torch.autograd.grad(a, (p, weights), grad_a)
    dp_ref, dw_ref = gate_gelu_mask_backward_reference(grad_a, p.detach(), indices, weights.detach(), E, scale)
    assert rel_err(dp_ref, dp) < 1e-12 and rel_err(dw_ref, dw) < 1e-12


def test_gate_gelu_mask_reference_zero_outside_selected_blocks():
    N, E, k, r = 7, 8, 2, 4
    p = torch.randn(N, E * r)
    indices, weights = random_routing(N, E, k, seed=1)
    a = gate_gelu_mask_reference(p, indices, weights, E, 1.0).view(N, E, r)
    selected = expert_gates(indices, torch.ones_like(weights), E).bool()        # (N, E)
    assert (a[~selected] == 0).all() and (a[selected] != 0).any()


def test_importing_and_running_moe_on_cpu_builds_nothing():
    """moe.py must stay CUDA-free on the CPU: no build, not even the cpp_extension import."""
    code = ("import sys, torch, moe, kernels\n"
            "from model import GPTConfig, MLP\n"
            "layer = moe.PESCMoE(MLP(GPTConfig(n_embd=16, n_head=2)), 16, n_experts=4, top_k=2, adapter_dim=4,\n"
            "                    dispatch='kernels')\n"
            "y, (aux, _, _) = layer(torch.randn(2, 3, 16)); (y.sum() + aux).backward()\n"
            "assert kernels._module is None, 'kernels.cu was built'\n"
            "assert 'torch.utils.cpp_extension' not in sys.modules, 'cpp_extension was imported'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_stale_build_lock_is_removed(tmp_path, capsys):
    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    kernels_module.clear_stale_lock(str(tmp_path))               # an hour-old lock: a killed build's
    assert not lock.exists()
    assert "removed the stale build lock" in capsys.readouterr().out
    lock.write_text("")                              # a fresh one: wait, then remove once it is stale
    t0 = time.time()
    kernels_module.clear_stale_lock(str(tmp_path), stale_after=2)
    assert not lock.exists() and 1.5 < time.time() - t0 < 30
    out = capsys.readouterr().out
    assert "waiting for another build" in out and "removed the stale build lock" in out
    kernels_module.clear_stale_lock(str(tmp_path))               # no lock: returns at once


def test_failed_build_prints_once_and_falls_back(monkeypatch, capsys):
    def broken_build():
        raise RuntimeError("Error building extension 'pesc_kernels': kernels.cu(1): error: a compiler message")
    monkeypatch.setattr(kernels_module, "_module", None)
    monkeypatch.setattr(kernels_module, "build", broken_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels_module.available() is False
    assert "kernels.cu(1): error: a compiler message" in capsys.readouterr().out
    assert kernels_module.available() is False                 # no second build, no second message
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError, match="need a GPU and a working build"):
        kernels_module.compiled()


def test_a_build_that_cannot_run_on_this_gpu_falls_back(monkeypatch, capsys):
    """A build for another architecture compiles and then fails at its first launch: the one-time
    probe catches that and the PyTorch path runs, with a message naming TORCH_CUDA_ARCH_LIST."""
    class WrongArchitecture:
        def route_forward(self, logits, top_k):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    monkeypatch.setattr(kernels_module, "_module", None)
    monkeypatch.setattr(kernels_module, "build", WrongArchitecture)
    monkeypatch.setattr(kernels_module, "probe", lambda module: module.route_forward(None, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    assert kernels_module.available() is False
    out = capsys.readouterr().out
    assert "no kernel image is available" in out and "TORCH_CUDA_ARCH_LIST" in out


class CudaLike:
    is_cuda = True


def test_kernels_are_not_used_for_float64_or_too_many_experts(monkeypatch):
    monkeypatch.setattr(kernels_module, "available", lambda: True)
    assert kernels_module.usable(CudaLike(), torch.zeros(2, 8))
    assert not kernels_module.usable(CudaLike(), torch.zeros(2, 8, dtype=torch.float64))   # a float64 layer
    assert not kernels_module.usable(CudaLike(), torch.zeros(2, kernels_module.MAX_EXPERTS + 1))
    assert not kernels_module.usable(torch.zeros(1), torch.zeros(2, 8))                    # a CPU tensor


def test_kernel_limits_agree_with_the_python_side():
    """kernels.cu refuses more than MAX_EXPERTS experts, and at that many the gate kernels' shared
    memory (GATE_WARPS rows x E ints) stays under the 48 KB a launch gets without the opt-in."""
    source = open(kernels_module.SOURCE).read()
    cu_max = int(re.search(r"constexpr int64_t MAX_EXPERTS = (\d+);", source).group(1))
    warps = int(re.search(r"constexpr int GATE_WARPS = (\d+);", source).group(1))
    assert cu_max == kernels_module.MAX_EXPERTS
    assert warps * cu_max * 4 <= 48 * 1024
    assert "blockIdx.x * GATE_WARPS + warp" not in source.replace("(int64_t)blockIdx.x * GATE_WARPS + warp", "")


def test_missing_ninja_is_named(monkeypatch):
    kernels_module.point_at_cuda()    # before cpp_extension's first import, as kernels.py does
    from torch.utils import cpp_extension

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    if torch.version.cuda is None:
        assert "without CUDA" in kernels_module.missing_toolchain()
    elif kernels_module.missing_toolchain() is not None and "nvcc" in kernels_module.missing_toolchain():
        pytest.skip("no nvcc here: the ninja check is not reached")
    else:
        assert "ninja" in kernels_module.missing_toolchain()


# -----------------------------------------------------------------------------
# where nvcc and CUDA-enabled torch are present: the build

@pytest.fixture(scope="module")
def kernels():
    """The compiled extension, built once per test session (1-2 minutes on 2 cores; cached after)."""
    why = kernels_module.missing_toolchain()
    if why:
        pytest.skip(f"kernels.cu cannot be built here: {why}")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"   # no GPU to take the architecture from: H100/H200
    return kernels_module.build()


def test_extension_builds_and_exposes_every_op(kernels):
    for name in OPS:
        assert callable(getattr(kernels, name, None)), f"the extension lacks {name}"
        assert getattr(kernels, name).__doc__, f"{name} has no docstring"
    assert any(f.startswith("pesc_kernels") and f.endswith(".so") for f in os.listdir(kernels_module.BUILD_DIR))


# -----------------------------------------------------------------------------
# on a GPU: the kernels against the references

@pytest.fixture(scope="module")
def gpu(kernels):
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible: the kernels were built but cannot run here")
    assert kernels_module.available(), "kernels.cu built but available() is False (see the probe's message)"
    return torch.device("cuda")


ROUTE_N = [1, 37, 128, 1000, 4099]   # 128 threads per block: one exact multiple, the rest not
GATE_N = [1, 9, 37, 1000, 2053]      # 8 rows per block: likewise
EK = [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2), (16, 4)]


@pytest.mark.parametrize("E,k", EK)
def test_route_kernel_matches_reference(gpu, E, k):
    for N in ROUTE_N:
        logits = gapped_logits(N, E, seed=N + 100 * E + k)
        logits_gpu = logits.to(gpu).requires_grad_(True)
        weights, indices, probs, counts = route_cuda(logits_gpu, k)
        assert weights.dtype == probs.dtype == torch.float32
        assert indices.dtype == counts.dtype == torch.int64
        x64 = logits.double().requires_grad_(True)
        w64, i64, p64 = RouteReference.apply(x64, k)
        assert torch.equal(indices.cpu(), i64), f"N={N}: indices differ"
        assert torch.equal(counts.cpu(), torch.bincount(i64.reshape(-1), minlength=E)), f"N={N}: counts differ"
        assert_close(weights, w64, 1e-5, 1e-4)
        assert_close(probs, p64, 1e-5, 1e-4)
        # backward, with gradients on both differentiable outputs
        gw, gp = torch.randn(N, k, dtype=torch.float64), torch.randn(N, E, dtype=torch.float64)
        (grad,) = torch.autograd.grad((weights * gw.to(gpu).float()).sum() + (probs * gp.to(gpu).float()).sum(),
                                      logits_gpu)
        (grad64,) = torch.autograd.grad((w64 * gw).sum() + (p64 * gp).sum(), x64)
        assert rel_err(grad, grad64) < 1e-5, f"N={N}: grad rel err {rel_err(grad, grad64):.2e}"


def test_route_kernel_ties_go_to_the_lower_index(gpu):
    N, E = 2000, 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (N, E), generator=g).float()     # values in {0, 1, 2}: ties everywhere
    logits[0] = 0.0                                                # a row all tied
    logits[1] = torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0, 5.0, -1.0, 5.0])
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices   # stable: lower index first
    for k in (1, 2, 4, 8):
        weights, indices, probs, counts = route_cuda(logits.to(gpu), k)
        assert torch.equal(indices.cpu(), order[:, :k])
        assert torch.equal(counts.cpu(), torch.bincount(order[:, :k].reshape(-1), minlength=E))
        assert_close(weights, F.softmax(logits.double().gather(1, order[:, :k]), dim=-1), 1e-5, 1e-4)
    assert route_cuda(logits.to(gpu), 2)[1][:2].tolist() == [[0, 1], [1, 2]]


def test_route_kernel_is_deterministic(gpu):
    logits = (3 * torch.randn(50_000, 16)).to(gpu).requires_grad_(True)
    gw, gp = torch.randn(50_000, 4, device=gpu), torch.randn(50_000, 16, device=gpu)
    runs = []
    for _ in range(2):
        outs = route_cuda(logits, 4)
        (grad,) = torch.autograd.grad((outs[0] * gw).sum() + (outs[2] * gp).sum(), logits)
        runs.append([t.detach().clone() for t in outs] + [grad])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("E,k", EK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_gelu_mask_kernel_matches_reference(gpu, dtype, E, k, r):
    scale = 0.75
    fp32 = dtype == torch.float32
    atol, rtol = (1e-5, 1e-4) if fp32 else (1e-2, 2e-2)
    for N in GATE_N:
        seed = N + 100 * E + 10 * k + r
        g = torch.Generator().manual_seed(seed)
        p = (2 * torch.randn(N, E * r, generator=g)).to(dtype)          # the bf16 case rounds once, here
        indices, weights = random_routing(N, E, k, seed)
        grad_a = torch.randn(N, E * r, generator=g).to(dtype)
        p_gpu, w_gpu = p.to(gpu).requires_grad_(True), weights.to(gpu).requires_grad_(True)
        a = gate_gelu_mask_cuda(p_gpu, indices.to(gpu), w_gpu, E, scale)
        assert a.dtype == dtype and a.shape == p.shape
        dp, dw = torch.autograd.grad(a, (p_gpu, w_gpu), grad_a.to(gpu))
        assert dp.dtype == dtype and dw.dtype == torch.float32
        # the float64 reference, fed the same (possibly bf16-rounded) inputs
        p64, w64, grad64 = p.double(), weights.double(), grad_a.double()
        a_ref = gate_gelu_mask_reference(p64, indices, w64, E, scale)
        dp_ref, dw_ref = gate_gelu_mask_backward_reference(grad64, p64, indices, w64, E, scale)
        assert_close(a, a_ref, atol, rtol)
        if fp32:
            assert rel_err(dp, dp_ref) < 1e-5 and rel_err(dw, dw_ref) < 1e-5, f"N={N}"
        else:
            assert_close(dp, dp_ref, atol, rtol)
            assert_close(dw, dw_ref, atol, rtol)
        # the blocks that were not selected are exactly zero, forward and backward
        selected = expert_gates(indices, torch.ones_like(weights), E).bool().to(gpu)
        assert (a.view(N, E, r)[~selected] == 0).all() and (dp.view(N, E, r)[~selected] == 0).all()


def test_gate_gelu_mask_kernel_gradcheck_float64(gpu):
    """The kernel is also built for float64 p, so gradcheck can test its backward directly (w.r.t. p;
    the weights are fp32 by contract)."""
    N, E, k, r = 11, 4, 2, 5
    p = (2 * torch.randn(N, E * r, dtype=torch.float64, device=gpu)).requires_grad_(True)
    indices, weights = random_routing(N, E, k, seed=3)
    indices, weights = indices.to(gpu), weights.to(gpu)
    assert torch.autograd.gradcheck(lambda p: gate_gelu_mask_cuda(p, indices, weights, E, 0.5), (p,))


def test_gate_gelu_mask_kernel_is_deterministic(gpu):
    N, E, k, r = 20_000, 16, 4, 64
    p = torch.randn(N, E * r, device=gpu, dtype=torch.bfloat16).requires_grad_(True)
    indices, weights = random_routing(N, E, k, seed=5)
    indices, weights = indices.to(gpu), weights.to(gpu).requires_grad_(True)
    grad_a = torch.randn(N, E * r, device=gpu, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        a = gate_gelu_mask_cuda(p, indices, weights, E, 1.0)
        runs.append([a.detach().clone(), *torch.autograd.grad(a, (p, weights), grad_a)])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def training_step(layer, h, grad_y, dispatch):
    layer.dispatch = dispatch
    h = h.clone().requires_grad_(True)
    y, (aux, counts, _) = layer(h)
    ((y.float() * grad_y).sum() + aux).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), aux.detach(), h.grad, grads, counts.clone()


@pytest.mark.parametrize("autocast", [False, True])
def test_pesc_layer_training_step_matches_pytorch_path(gpu, autocast, capsys):
    from model import GPTConfig, MLP
    torch.manual_seed(0)
    d, E, k, r, N = 64, 8, 2, 16, 300
    layer = PESCMoE(MLP(GPTConfig(n_embd=d, n_head=4)), d, n_experts=E, top_k=k, adapter_dim=r,
                    adapter_scale=0.5, aux_loss_coef=0.01, z_loss_coef=1e-3).to(gpu)
    with torch.no_grad():
        layer.w_up.normal_(0.0, 0.05)                         # nonzero W_up: every path carries gradient
        layer.router.gate.weight.normal_(0.0, 0.3)            # spread the tokens over the experts
    twin = PESCMoE(MLP(GPTConfig(n_embd=d, n_head=4)), d, n_experts=E, top_k=k, adapter_dim=r,
                   adapter_scale=0.5, aux_loss_coef=0.01, z_loss_coef=1e-3).to(gpu)
    twin.load_state_dict(layer.state_dict())
    h, grad_y = torch.randn(4, N // 4, d, device=gpu), torch.randn(4, N // 4, d, device=gpu)
    moe._said.clear()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        fused = training_step(layer, h, grad_y, "kernels")
        plain = training_step(twin, h, grad_y, "masked")
    said = capsys.readouterr().out
    assert "runs the kernels path" in said and "runs the masked path" in said
    y, aux, dh, grads, counts = fused
    y_ref, aux_ref, dh_ref, grads_ref, counts_ref = plain
    assert torch.equal(counts, counts_ref) and (counts > 0).all()
    assert grads.keys() == grads_ref.keys() and {"router.gate.weight", "w_up", "w_down"} <= set(grads)
    if not autocast:
        assert_close(y, y_ref, 1e-5, 1e-4)
        assert abs(aux.item() - aux_ref.item()) <= 1e-6
        assert rel_err(dh, dh_ref) < 1e-5
        for name in grads:
            assert rel_err(grads[name], grads_ref[name]) < 1e-5, name
    else:  # bf16 matmuls on both paths; the paths round differently between them
        assert_close(y, y_ref, 1e-2, 2e-2)
        assert abs(aux.item() - aux_ref.item()) <= 1e-5
        for name in grads:
            assert rel_err(grads[name], grads_ref[name]) < 2e-2, name


@pytest.mark.parametrize("dispatch", ["loop", "grouped", "masked"])
def test_other_dispatches_stay_pytorch(gpu, monkeypatch, dispatch):
    from model import GPTConfig, MLP
    layer = PESCMoE(MLP(GPTConfig(n_embd=32, n_head=4)), 32, n_experts=4, top_k=2, adapter_dim=8,
                    dispatch=dispatch).to(gpu)

    def fail(*args):
        raise AssertionError("a kernel was called")
    monkeypatch.setattr(kernels_module, "route_cuda", fail)
    monkeypatch.setattr(kernels_module, "gate_gelu_mask_cuda", fail)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(torch.randn(2, 5, 32, device=gpu))


def test_argument_checks(gpu, kernels):
    N, E, k, r = 10, 8, 2, 16
    logits = torch.randn(N, E, device=gpu)
    p = torch.randn(N, E * r, device=gpu)
    indices, weights = (t.to(gpu) for t in random_routing(N, E, k, seed=0))
    bad = [
        # router
        (lambda: route_cuda(logits.double(), k), "logits must be Float"),
        # (the autograd wrappers make their inputs contiguous: the extension's own checks are called directly)
        (lambda: kernels.route_forward(logits.t(), 2), "logits must be contiguous"),
        (lambda: route_cuda(logits.cpu(), k), "logits must be a CUDA tensor"),
        (lambda: route_cuda(logits[0], k), "logits must be 2-D"),
        (lambda: route_cuda(logits, E + 1), r"top_k must be in \[1, E=8\]"),
        (lambda: route_cuda(logits, 0), "top_k must be in"),
        (lambda: kernels.route_backward(weights, torch.randn(N, E + 1, device=gpu), weights, indices,
                                        torch.randn(N, E, device=gpu)), "grad_probs must have shape"),
        (lambda: kernels.route_backward(weights, logits, weights, indices.int(), logits), "indices must be Long"),
        # gate-GELU-mask
        (lambda: gate_gelu_mask_cuda(p.int(), indices, weights, E, 1.0), "p must be float32 or bfloat16"),
        (lambda: gate_gelu_mask_cuda(p, indices.int(), weights, E, 1.0), "indices must be Long"),
        (lambda: gate_gelu_mask_cuda(p, indices, weights.double(), E, 1.0), "weights must be Float"),
        (lambda: kernels.gate_gelu_mask_forward(torch.randn(E * r, N, device=gpu).t(), indices, weights, E, 1.0),
         "p must be contiguous"),
        (lambda: gate_gelu_mask_cuda(p.cpu(), indices, weights, E, 1.0), "p must be a CUDA tensor"),
        (lambda: gate_gelu_mask_cuda(p, indices.cpu(), weights, E, 1.0), "indices must be a CUDA tensor"),
        (lambda: gate_gelu_mask_cuda(p[:, :-1].contiguous(), indices, weights, E, 1.0), "not a positive multiple"),
        (lambda: gate_gelu_mask_cuda(p, indices[:-1].contiguous(), weights, E, 1.0), "indices must have N=10 rows"),
        (lambda: gate_gelu_mask_cuda(p, indices, weights[:, :1].contiguous(), E, 1.0), "weights must have shape"),
        (lambda: gate_gelu_mask_cuda(p[0], indices, weights, E, 1.0), "p must be 2-D"),
        (lambda: kernels.gate_gelu_mask_backward(p.bfloat16(), p, indices, weights, E, 1.0),
         "grad_a must have p's dtype"),
        (lambda: kernels.gate_gelu_mask_backward(p[:, :r].contiguous(), p, indices, weights, E, 1.0),
         "grad_a must have p's shape"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_wrappers_accept_non_contiguous_inputs(gpu):
    """The extension refuses strided tensors (test_argument_checks); the autograd wrappers make their
    inputs contiguous first, so transposed views (as a caller may hold) give the references' results."""
    N, E, k, r = 37, 8, 2, 16
    logits_t = gapped_logits(N, E, seed=5).t().contiguous().t().to(gpu)   # (N, E), stored column-major
    assert not logits_t.is_contiguous()
    weights, indices, probs, counts = route_cuda(logits_t, k)
    ref = route(logits_t.contiguous(), k)
    assert torch.equal(indices, ref[1]) and torch.equal(counts, ref[3])
    assert_close(weights, ref[0], 1e-6, 1e-5)
    assert_close(probs, ref[2], 1e-6, 1e-5)
    p_t = torch.randn(E * r, N, device=gpu).t()                          # (N, E*r), strided
    assert not p_t.is_contiguous()
    a = gate_gelu_mask_cuda(p_t, indices, weights, E, 0.5)
    assert_close(a, gate_gelu_mask_reference(p_t.contiguous(), indices, weights, E, 0.5), 1e-6, 1e-5)


def test_empty_batch(gpu):
    weights, indices, probs, counts = route_cuda(torch.empty(0, 8, device=gpu), 2)
    assert weights.shape == (0, 2) and probs.shape == (0, 8) and counts.tolist() == [0] * 8
    a = gate_gelu_mask_cuda(torch.empty(0, 64, device=gpu), indices, weights, 8, 1.0)
    assert a.shape == (0, 64)
