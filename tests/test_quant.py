"""
Tests for quant.py (NF4 storage of QLoRA). Every check compares against something computed
independently of quant.py: the 16 values bitsandbytes ships, hand-written bytes and counts,
brute-force nearest-value search, error bounds derived in the comments, a dense nn.Linear,
torch.autograd.gradcheck.

Run: python3 -m pytest -q tests/test_quant.py
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import (NF4, Linear4bit, double_dequantize, double_quantize, dequantize_nf4, nf4_bytes,
                   nf4_code_book, quantize_linears_, quantize_nf4)

# The NF4 table as bitsandbytes ships it (bitsandbytes/backends/utils.py, _NF4_QUANT_TABLE; the same
# numbers are in the QLoRA paper's appendix and in bnb's CUDA kernels).
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def bnb_table():
    return torch.tensor(BNB_NF4, dtype=torch.float32)


def unpack_by_hand(codes):
    """Indices from packed bytes, written independently of quant.py: high nibble first."""
    out = []
    for b in codes.tolist():
        out += [b >> 4, b & 15]
    return torch.tensor(out)


def brute_force_nearest(scaled):
    """Index of the nearest of the 16 bnb values, by an explicit argmin over all 16 distances."""
    table = torch.tensor(BNB_NF4, dtype=torch.float64)
    dist = (scaled.double().reshape(-1, 1) - table.reshape(1, -1)).abs()   # (n, 16)
    return dist.argmin(dim=1)


# ---------------------------------------------------------------------------------------------
# Code book

def test_code_book_matches_bitsandbytes_table():
    book = nf4_code_book()
    assert book.shape == (16,) and book.dtype == torch.float32
    assert (book - bnb_table()).abs().max().item() <= 1e-6
    assert torch.equal(NF4, book)
    assert int((book == 0).sum()) == 1
    assert book.min().item() == -1.0 and book.max().item() == 1.0
    assert torch.all(book[1:] > book[:-1])   # strictly ascending
    # asymmetric: 7 negative, 8 positive values
    assert int((book < 0).sum()) == 7 and int((book > 0).sum()) == 8


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize

def test_code_book_values_round_trip_bitwise():
    # Two blocks whose elements are a * (code value), every value present (so max |.| = a * 1.0 = a),
    # shuffled, plus an all-zero block (must not divide by zero and must come back as zeros).
    # quant.NF4 (not the bnb table, which it matches only to 2e-7): bitwise needs the layer's own values.
    g = torch.Generator().manual_seed(0)
    blocks = []
    for a in (0.37, 2.5e-3):
        vals = torch.tensor(a, dtype=torch.float32) * NF4.repeat(4)               # (64,)
        blocks.append(vals[torch.randperm(64, generator=g)])
    blocks.append(torch.zeros(64))
    w = torch.cat(blocks).reshape(3, 64)
    q = quantize_nf4(w)
    assert torch.equal(q["absmax"], torch.tensor([0.37, 2.5e-3, 0.0], dtype=torch.float32))
    w_hat = dequantize_nf4(q)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    assert torch.equal(w_hat, w)                                 # bitwise
    assert torch.isfinite(w_hat).all()
    # the zero block: every element is code 7 (the exact 0) -> bytes 0x77
    assert q["codes"][64:].tolist() == [0x77] * 32


def test_packing_order_high_nibble_first():
    # block_size 8, absmax 1 (each block holds -1.0 = index 0), so each element's code is its index.
    idx = [0, 15, 7, 3, 15, 0, 1, 2, 14, 9, 8, 6, 0, 4, 10, 11]
    w = NF4[idx].reshape(2, 8)
    q = quantize_nf4(w, block_size=8)
    # element 2i -> high nibble, element 2i+1 -> low nibble (bitsandbytes' order), written out:
    expected = [0x0F, 0x73, 0xF0, 0x12, 0xE9, 0x86, 0x04, 0xAB]
    assert q["codes"].dtype == torch.uint8
    assert q["codes"].tolist() == expected
    assert q["absmax"].tolist() == [1.0, 1.0]
    assert torch.equal(dequantize_nf4(q), w)


def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * 0.02
    q = quantize_nf4(w)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)              # computed here, not by quant.py
    assert torch.equal(q["absmax"], absmax.squeeze(1))
    expected = brute_force_nearest(blocks / absmax)
    assert torch.equal(unpack_by_hand(q["codes"]), expected)

    # values in [-1, 1] spread uniformly, with a 1.0 in every block so they are not rescaled
    x = torch.rand(4096, generator=g) * 2 - 1
    x[::64] = 1.0
    q = quantize_nf4(x)
    assert torch.equal(unpack_by_hand(q["codes"]), brute_force_nearest(x))


def test_gaussian_error_bounds_and_mean_relative_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(512, 1024, generator=g) * 0.02
    q = quantize_nf4(w)
    w_hat = dequantize_nf4(q)
    err = (w_hat - w).abs().reshape(-1, 64)                      # (n_blocks, 64)
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)   # (n_blocks, 1)
    # Nearest-value rounding: within a block the error is at most half the widest gap of the table
    # times the block's absmax. The widest gap is the negative end, -1.0 .. -0.6961928 (0.3038; the
    # positive end 0.7229568 .. 1.0 is 0.2770): half of it is 0.1519.
    max_half_gap = (bnb_table()[1:] - bnb_table()[:-1]).max().item() / 2
    assert math.isclose(max_half_gap, (1.0 - 0.6961928009986877) / 2, rel_tol=1e-6)
    assert torch.all(err <= absmax * max_half_gap + 1e-7)
    # Mean relative error mean|W - W_hat| / mean|W|: measured 0.0912 for this seed (the elementwise
    # mean of |err|/|w| is 0.203, dominated by weights near 0, so we use the ratio of means).
    rel = (err.mean() / w.abs().mean()).item()
    assert 0.085 < rel < 0.097, rel


def test_rejects_shapes_that_do_not_fill_blocks():
    with pytest.raises(ValueError, match="multiple of block_size=64"):
        quantize_nf4(torch.randn(10, 10))
    with pytest.raises(ValueError):
        Linear4bit(10, 10)
    quantize_nf4(torch.randn(8, 8))            # 64 elements: fine


# ---------------------------------------------------------------------------------------------
# Double quantization

def test_double_quantize_hand_example():
    # mean 3.2 -> centred [-2.2, -1.2, -0.2, 0.8, 2.8], block absmax 2.8,
    # round(c / 2.8 * 127) = round([-99.79, -54.43, -9.07, 36.29, 127]) = [-100, -54, -9, 36, 127]
    dq = double_quantize(torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0]))
    assert dq["codes"].dtype == torch.int8
    assert dq["codes"].tolist() == [-100, -54, -9, 36, 127]
    assert dq["scale"].tolist() == [pytest.approx(2.8, abs=1e-6)]
    assert dq["offset"].item() == pytest.approx(3.2, abs=1e-6)
    back = double_dequantize(dq)
    assert torch.allclose(back, torch.tensor([-100, -54, -9, 36, 127]) * 2.8 / 127 + 3.2, atol=1e-6)


def test_double_quantize_error_bound():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(600 * 64, generator=g) * 0.02              # 600 absmax values: 2 full blocks + 88
    absmax = quantize_nf4(w)["absmax"]
    dq = double_quantize(absmax)
    assert dq["codes"].shape == (600,) and dq["scale"].shape == (3,)
    assert dq["codes"].abs().max().item() <= 127
    back = double_dequantize(dq)
    assert back.dtype == torch.float32 and back.shape == absmax.shape
    # Bound, derived: each centred value c = a - mean is stored as round(c / s * 127) with s the
    # block's max |c|, so |c - c_hat| <= 0.5 * s / 127 = s / 254 (plus fp32 rounding).
    a = absmax.double()
    centred = a - a.mean()
    s = F.pad(centred, (0, 168)).reshape(3, 256).abs().amax(dim=1)   # (3,) per-block scale
    bound = s.repeat_interleave(256)[:600] / 254 + 1e-6 * a.max()
    assert torch.all((back.double() - a).abs() <= bound)


def test_double_quant_changes_weights_only_slightly():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(512, 1024, generator=g) * 0.02
    q1, q2 = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert "absmax_dq" in q2 and "absmax" not in q2
    assert torch.equal(q1["codes"], q2["codes"])                # same 4-bit codes, only constants differ
    w1, w2 = dequantize_nf4(q1), dequantize_nf4(q2)
    # |code| <= 1, so each weight moves by at most its block's absmax error (bounded as above)
    absmax_err = (double_dequantize(q2["absmax_dq"]) - q1["absmax"]).abs()
    assert torch.all((w2 - w1).abs().reshape(-1, 64) <= absmax_err[:, None] + 1e-9)
    # mean relative error mean|W - W_hat| / mean|W|: measured 0.09118 without, 0.09125 with double quant
    e1 = ((w1 - w).abs().mean() / w.abs().mean()).item()
    e2 = ((w2 - w).abs().mean() / w.abs().mean()).item()
    assert abs(e2 - e1) < 0.002, (e1, e2)


def test_nf4_bytes_hand_count():
    n = 4096 * 4096                      # 16,777,216 weights, 262,144 blocks of 64
    # no double quant: 8,388,608 code bytes + 262,144 * 4 absmax bytes
    assert nf4_bytes(n, double_quant=False) == 8_388_608 + 1_048_576
    # double quant: codes + 262,144 int8 + 1,024 fp32 scales + 1 fp32 mean = 8,654,852
    assert nf4_bytes(n) == 8_654_852
    assert nf4_bytes(n, double_quant=False) * 8 / n == 4.5
    assert abs(nf4_bytes(n) * 8 / n - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-5   # ~4.127 bits
    # 300 blocks: 9,600 code bytes + 300 int8 + 2 fp32 scales + 1 fp32 mean
    assert nf4_bytes(64 * 300) == 9_600 + 300 + 8 + 4
    # the layer's buffers hold exactly that many bytes
    for dq in (False, True):
        m = Linear4bit(192, 100, bias=False, double_quant=dq)
        assert sum(b.numel() * b.element_size() for b in m.buffers()) == nf4_bytes(192 * 100, double_quant=dq)


def test_quantization_is_deterministic():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(128, 256, generator=g)
    for dq in (False, True):
        a, b = quantize_nf4(w, double_quant=dq), quantize_nf4(w.clone(), double_quant=dq)
        assert torch.equal(a["codes"], b["codes"])
        if dq:
            for k in ("codes", "scale", "offset"):
                assert torch.equal(a["absmax_dq"][k], b["absmax_dq"][k])
        else:
            assert torch.equal(a["absmax"], b["absmax"])
    lin = nn.Linear(256, 128)
    sd1, sd2 = Linear4bit.from_linear(lin).state_dict(), Linear4bit.from_linear(lin).state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


# ---------------------------------------------------------------------------------------------
# Linear4bit

def make_layer(double_quant=True, bias=True, seed=5):
    torch.manual_seed(seed)
    lin = nn.Linear(96, 80, bias=bias)
    return lin, Linear4bit.from_linear(lin, double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_matches_dense(double_quant):
    lin, m = make_layer(double_quant)
    w_hat = m.dequantized_weight(torch.float32)
    assert w_hat.shape == (80, 96)
    # the stored weight is the original within the NF4 bound: half the widest gap (0.1519) times the
    # block absmax (<= max |W|), plus a little for the 8-bit absmax when double quantized
    assert (w_hat - lin.weight).abs().max() <= lin.weight.abs().max() * 0.1519 * 1.01
    x = torch.randn(4, 7, 96)
    y = m(x)
    assert y.shape == (4, 7, 80) and y.dtype == torch.float32
    assert torch.allclose(y, F.linear(x, w_hat, lin.bias), atol=1e-6, rtol=0)
    # no trainable state, no dense `weight` parameter
    assert [p for p in m.parameters() if p.requires_grad] == []
    assert not isinstance(getattr(m, "weight", None), nn.Parameter)
    assert "in_features=96" in repr(m) and "out_features=80" in repr(m)


def test_linear4bit_input_gradient_matches_dense():
    lin, m = make_layer()
    dense = nn.Linear(96, 80)
    with torch.no_grad():
        dense.weight.copy_(m.dequantized_weight(torch.float32))
        dense.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 96)
    grad_y = torch.randn(3, 5, 80)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    m(x1).backward(grad_y)
    dense(x2).backward(grad_y)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=0)
    # nothing stored in the layer receives a gradient
    for name, b in m.named_buffers():
        assert b.grad is None and not b.requires_grad, name
    assert m.bias.grad is None and not m.bias.requires_grad


def test_linear4bit_gradcheck_float64():
    # fp64 input -> the layer dequantizes to fp64; finite differences check the custom backward.
    _, m = make_layer()
    x = torch.randn(2, 96, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_state_dict_round_trip(double_quant):
    _, m = make_layer(double_quant)
    sd = m.state_dict()
    expected_keys = {"codes", "bias"} | ({"absmax_codes", "absmax_scale", "absmax_offset"} if double_quant
                                         else {"absmax"})
    assert set(sd) == expected_keys
    fresh = Linear4bit(96, 80, bias=True, double_quant=double_quant)
    fresh.load_state_dict(sd)            # strict
    x = torch.randn(6, 96)
    assert torch.equal(fresh(x), m(x))


def test_linear4bit_autocast_bf16():
    _, m = make_layer()
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.detach(), m.dequantized_weight(torch.float32), m.bias)
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_linear4bit_buffers_move_with_to():
    _, m = make_layer()
    m.to("meta")                         # no GPU here; the meta device shows the buffers move
    assert all(b.device.type == "meta" for b in m.buffers())
    assert m.bias.device.type == "meta"
    assert m.codes.dtype == torch.uint8 and m.absmax_codes.dtype == torch.int8


def test_backward_keeps_only_packed_storage():
    """The graph must not hold the dequantized weight (nor x) for backward, unlike a dense Linear."""
    _, m = make_layer()
    x = torch.randn(8, 96, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert not any(t.is_floating_point() and t.numel() >= 96 for t in saved)   # neither W (80x96) nor x (8x96)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == nf4_bytes(96 * 80)                    # just the 4-bit storage ...
    assert any(t.data_ptr() == m.codes.data_ptr() for t in saved)  # ... the layer's own buffers, no copy
    y.sum().backward()
    assert x.grad is not None

    # for contrast: the dense layer saves x and the fp32 weight (4 bytes per weight)
    dense = nn.Linear(96, 80)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense(x)
    assert sum(t.numel() * t.element_size() for t in saved) >= 4 * 96 * 80


# ---------------------------------------------------------------------------------------------
# quantize_linears_

class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.attn = nn.ModuleDict(dict(q=nn.Linear(64, 64), k=nn.Linear(64, 64), v=nn.Linear(64, 64)))
        self.ffn = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.router = nn.Linear(64, 4, bias=False)
        self.adapter = nn.Sequential(nn.Linear(64, 8, bias=False), nn.Linear(8, 64, bias=False))
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.attn["q"](h) + self.attn["k"](h) + self.attn["v"](h)
        h = h + self.ffn(h) + self.adapter(h) + self.router(h).sum(-1, keepdim=True)
        return self.lm_head(self.norm(h))


def test_quantize_linears_replaces_exactly_the_chosen_layers():
    torch.manual_seed(6)
    model = ToyBlock()
    idx = torch.randint(0, 50, (2, 9))
    before = model(idx)
    kept = {n: m for n, m in model.named_modules() if n in ("router", "adapter.0", "adapter.1", "lm_head")}
    seen = []

    def choose(name, linear):
        seen.append(name)
        return name.startswith(("attn.", "ffn."))

    n = quantize_linears_(model, choose)
    assert n == 5
    # every nn.Linear was offered, under its qualified name
    assert sorted(seen) == sorted(["attn.q", "attn.k", "attn.v", "ffn.0", "ffn.2", "router",
                                   "adapter.0", "adapter.1", "lm_head"])
    for name in ("attn.q", "attn.k", "attn.v", "ffn.0", "ffn.2"):
        assert isinstance(model.get_submodule(name), Linear4bit), name
    for name, mod in kept.items():
        assert model.get_submodule(name) is mod and type(mod) is nn.Linear, name
    assert type(model.emb) is nn.Embedding and type(model.norm) is nn.LayerNorm
    after = model(idx)
    assert after.shape == before.shape
    assert (after - before).abs().max() < 0.25 * before.abs().max()   # same function, 4-bit weights
    assert quantize_linears_(model, choose) == 0                      # nothing left to replace
