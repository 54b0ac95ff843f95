"""
The 4-bit NormalFloat (NF4) storage of QLoRA (Dettmers et al., 2023, arXiv:2305.14314), written out
in plain PyTorch: the frozen base weights of PESC's attention and FFN projections can be kept in
~4.13 bits per weight while the adapters, routers and LoRA factors train in full precision.

What is here
    nf4_code_book / NF4      the 16 NF4 values: quantiles of N(0, 1), with an exact 0, scaled to [-1, 1]
    quantize_nf4             blockwise absmax (64 consecutive elements) + nearest NF4 value, 2 codes a byte
    double_quantize          QLoRA's "double quantization" of the per-block absmax constants (8 bit, block 256)
    dequantize_nf4           the inverse, to any float dtype
    Linear4bit               a frozen linear layer holding packed codes as buffers; its autograd Function
                             saves only the codes and dequantizes again in backward (input gradient only)
    quantize_linears_        swaps chosen nn.Linear children for Linear4bit, in place
    nf4_bytes                storage bytes, for memory tables

Storage per weight (block 64; double quant: block 256 for the constants):
    without double quant: 4 + 32/64              = 4.5   bits
    with double quant:    4 + 8/64 + 32/(64*256) ~ 4.127 bits  (+ one fp32 mean per tensor)

Facts taken from the paper and from bitsandbytes (no code copied; bnb file paths for checking):
  - code book: QLoRA Sec. 3 "4-bit NormalFloat": 2^(k-1) quantiles for the negative half, 2^(k-1)+1
    for the positive half, unified, one of the two zeros removed, normalised by the absolute maximum.
    bnb's create_normal_map (bitsandbytes/functional.py) takes the quantiles of
    linspace(offset, 0.5, 9)[:-1] (8 positive) and of linspace(offset, 0.5, 8)[:-1] (7 negative),
    adds 0, sorts and divides by the max, with offset = 0.9677083; that literal is
    1 - (1/30 + 1/32) / 2 to 7 digits, which is what we use. Result vs the table bnb ships
    (bitsandbytes/backends/utils.py, _NF4_QUANT_TABLE): max |diff| 1.9e-7.
  - packing: bnb's reference kernel (bitsandbytes/backends/default/ops.py, quantize_4bit) packs
    `q[::2] << 4 | q[1::2]`: element 2i in the HIGH nibble, element 2i+1 in the LOW nibble. Same here.
  - double quant (bitsandbytes/functional.py, quantize_4bit with compress_statistics=True): subtract
    absmax.mean() (kept as one fp32 offset), then blockwise 8-bit quantization with blocksize 256.
    bnb uses its 8-bit *dynamic* (non-linear) code there; we use symmetric linear int8, see
    double_quantize for why.
  - nearest value: bnb's reference path takes argmin |x - code|; we find the same nearest value with
    torch.bucketize on the midpoints (O(log 16) per element, no (n, 16) temporary).

Test: python3 -m pytest -q tests/test_quant.py
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# The NF4 code book

def nf4_code_book():
    """The 16 NF4 values, float32, sorted ascending: 7 negative, an exact 0, 8 positive, in [-1, 1]."""
    # QLoRA estimates quantiles of N(0, 1) at evenly spaced probabilities. The outermost probability
    # cannot be 1 (ndtri(1) = inf), so it is pulled in. bnb hard-codes 0.9677083, which equals
    # 1 - (1/30 + 1/32) / 2: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), the outermost bin centres of
    # 15- and 16-bin equal-probability grids (our reading of the literal; the paper does not spell it out).
    p_max = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)
    # float64 for the quantiles so the only rounding is the final cast to float32.
    p_pos = torch.linspace(p_max, 0.5, 9, dtype=torch.float64)[:-1]   # (8,) drop p=0.5 (the zero)
    p_neg = torch.linspace(p_max, 0.5, 8, dtype=torch.float64)[:-1]   # (7,)
    positive = torch.special.ndtri(p_pos)                              # (8,) largest first
    negative = -torch.special.ndtri(p_neg)                             # (7,)
    zero = torch.zeros(1, dtype=torch.float64)                         # (1,) exact 0: padding, zeros
    values = torch.cat([negative, zero, positive]).sort().values       # (16,)
    # Asymmetric: the positive half has one more value, so its end is the absolute maximum and the
    # normalised book runs from -1 (negative end, same probability) to exactly 1.
    values = values / values.max()
    return values.float()


NF4 = nf4_code_book()  # (16,) float32, NF4[7] == 0


# ----------------------------------------------------------------------------------------------
# Quantize / dequantize

def _check_blocks(numel, block_size):
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    if numel % block_size:
        raise ValueError(f"NF4 quantization needs numel to be a multiple of block_size={block_size}; got "
                         f"numel={numel}. Any shape whose element count is a multiple of {block_size} works "
                         f"(e.g. a Linear with in_features * out_features divisible by {block_size}).")


def _nearest_code(x):
    """Index (uint8, 0..15) of the NF4 value nearest to each element of x (x in [-1, 1], float32)."""
    book = NF4.to(x.device)
    midpoints = (book[1:] + book[:-1]) / 2                         # (15,) decision boundaries
    # bucketize (right=False) gives i with midpoints[i-1] < x <= midpoints[i]: the code between those
    # two boundaries. A value exactly on a midpoint goes to the lower code, the same tie rule as
    # argmin (first minimum) in bnb's reference path.
    return torch.bucketize(x, midpoints).to(torch.uint8)


def _pack(idx):
    """(n,) uint8 in 0..15 -> (n/2,) uint8. Element 2i -> high nibble, 2i+1 -> low nibble (as bnb)."""
    pairs = idx.view(-1, 2)                                        # (n/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]                        # (n/2,)


def _unpack(codes):
    """(n/2,) uint8 -> (n,) int64 indices, undoing _pack."""
    high = (codes >> 4).long()                                     # (n/2,) elements 0, 2, 4, ...
    low = (codes & 0x0F).long()                                    # (n/2,) elements 1, 3, 5, ...
    return torch.stack([high, low], dim=1).reshape(-1)             # (n,)


def double_quantize(absmax, block_size=256):
    """QLoRA's double quantization of the absmax constants.

    absmax (n,) float -> dict(codes=int8 (n,), scale=float32 (ceil(n/block_size),), offset=float32 (),
    block_size=int). The last block may be partial (n need not be a multiple of block_size).

    The absmax values are all positive and cluster around their mean, so QLoRA subtracts the mean first
    (one fp32 offset per tensor) to use both signs of the 8-bit code. Then each block of 256 is
    scaled by its own absolute maximum `scale` and rounded to an integer in [-127, 127].

    Why linear int8 and not bnb's dynamic 8-bit code: the dynamic code spends its resolution near
    zero for values spanning orders of magnitude; the centred absmax of a weight matrix spans well
    under one order of magnitude, so the linear code is about as accurate here, needs no second
    code book, and has a one-line error bound: |error| <= scale / 254 (half a step of scale / 127).
    """
    absmax = absmax.detach().float().reshape(-1)                   # (n,)
    n = absmax.numel()
    offset = absmax.mean()                                         # () fp32
    centred = absmax - offset                                      # (n,)
    n_blocks = math.ceil(n / block_size)
    padded = F.pad(centred, (0, n_blocks * block_size - n))        # (n_blocks * block_size,) zero pad
    blocks = padded.view(n_blocks, block_size)                     # (n_blocks, block_size)
    scale = blocks.abs().amax(dim=1)                               # (n_blocks,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))   # a constant block: no 0/0
    q = torch.round(blocks / safe[:, None] * 127)                  # (n_blocks, block_size) in [-127, 127]
    codes = q.to(torch.int8).reshape(-1)[:n]                       # (n,)
    return dict(codes=codes, scale=scale, offset=offset, block_size=block_size)


def _double_dequantize(codes, scale, offset, block_size):
    n = codes.numel()
    n_blocks = scale.numel()
    padded = F.pad(codes.float(), (0, n_blocks * block_size - n))  # (n_blocks * block_size,)
    blocks = padded.view(n_blocks, block_size) * (scale.float()[:, None] / 127)  # (n_blocks, block_size)
    absmax = blocks.reshape(-1)[:n] + offset.float()               # (n,)
    # The 8-bit error can push an absmax that was ~0 (an all-zero block) slightly below 0, which would
    # flip that block's signs; an absmax is never negative, so clamp.
    return absmax.clamp_min(0.0)


def double_dequantize(dq):
    """Inverse of double_quantize: dict -> absmax float32 (n,)."""
    return _double_dequantize(dq["codes"], dq["scale"], dq["offset"], dq["block_size"])


def quantize_nf4(w, block_size=64, double_quant=False):
    """Blockwise NF4 quantization of a float tensor.

    w: any float tensor with w.numel() % block_size == 0 (else ValueError). Blocks are consecutive
    elements of w.flatten(). Each element is divided by its block's absolute maximum and replaced by the
    index (0..15) of the nearest NF4 value; two indices per byte, element 2i in the HIGH nibble and
    element 2i+1 in the LOW nibble (bitsandbytes' order).

    Returns dict(codes=uint8 (numel/2,), shape=tuple, block_size=int) plus either
      absmax=float32 (numel/block_size,)                         (double_quant=False), or
      absmax_dq=double_quantize(absmax)  (int8 codes, fp32 scales, fp32 offset)  (double_quant=True).
    Deterministic: the same w gives bitwise the same result.
    """
    _check_blocks(w.numel(), block_size)
    x = w.detach().float().reshape(-1, block_size)                 # (n_blocks, block_size)
    absmax = x.abs().amax(dim=1)                                   # (n_blocks,)
    # An all-zero block has absmax 0: divide by 1 instead (its elements are 0 -> the exact-0 code).
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    # |x| <= absmax and IEEE division is correctly rounded, so |x / absmax| <= 1 without a clamp.
    scaled = x / safe[:, None]                                     # (n_blocks, block_size) in [-1, 1]
    idx = _nearest_code(scaled.reshape(-1))                        # (numel,) uint8
    q = dict(codes=_pack(idx), shape=tuple(w.shape), block_size=block_size)
    if double_quant:
        q["absmax_dq"] = double_quantize(absmax)
    else:
        q["absmax"] = absmax
    return q


def _dequantize(codes, absmax, shape, block_size, dtype):
    """codes (n/2,) uint8, absmax (n/block_size,) float32 -> tensor of `shape` in `dtype`."""
    values = NF4.to(codes.device)[_unpack(codes)]                  # (n,) fp32 in [-1, 1]
    w = values.view(-1, block_size) * absmax.float()[:, None]      # (n_blocks, block_size) fp32
    # Multiply in fp32 and round once to the target dtype (like bnb's kernels, which compute in float).
    return w.reshape(shape).to(dtype)


def dequantize_nf4(q, dtype=torch.float32):
    """Inverse of quantize_nf4: dict -> tensor of q["shape"] in `dtype`."""
    absmax = double_dequantize(q["absmax_dq"]) if "absmax_dq" in q else q["absmax"]
    return _dequantize(q["codes"], absmax, q["shape"], q["block_size"], dtype)


def nf4_bytes(n_params, double_quant=True, block_size=64, dq_block_size=256):
    """Bytes to store one tensor of n_params weights in NF4: packed codes + quantization constants.

    without double quant: n/2 + 4 * n/block_size
    with double quant:    n/2 + n/block_size (int8) + 4 * ceil(n_blocks/dq_block_size) (fp32 scales) + 4 (mean)
    """
    _check_blocks(n_params, block_size)
    n_blocks = n_params // block_size
    if not double_quant:
        return n_params // 2 + 4 * n_blocks
    return n_params // 2 + n_blocks + 4 * math.ceil(n_blocks / dq_block_size) + 4


# ----------------------------------------------------------------------------------------------
# The frozen 4-bit linear layer

class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T with W stored in NF4. Saves only the stored (packed) tensors for backward, never the
    dequantized W nor x: backward dequantizes W again to get dL/dx = dL/dy W. W is frozen, so there is
    no dL/dW (which would need x). That is QLoRA's memory saving: per layer, what backward keeps is
    the 4-bit storage the module already holds, no extra activation or weight copy."""

    @staticmethod
    def forward(ctx, x, meta, codes, *constants):
        # meta = (shape, block_size, dq_block_size or None, dtype); constants = (absmax,) or
        # (absmax_codes, absmax_scale, absmax_offset): the module's buffers, saved without copying.
        ctx.meta = meta
        ctx.save_for_backward(codes, *constants)
        w = _weight_from_storage(meta, codes, constants)           # (out, in), freed on return
        return F.linear(x, w)                                      # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        codes, *constants = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = _weight_from_storage(ctx.meta, codes, constants)   # (out, in) dequantized again
            grad_x = grad_y.to(w.dtype) @ w                        # (..., out) @ (out, in) -> (..., in)
        # one gradient per forward input: x, meta, codes, *constants; only x gets one
        return (grad_x, None, None) + (None,) * len(constants)


def _weight_from_storage(meta, codes, constants):
    shape, block_size, dq_block_size, dtype = meta
    if dq_block_size is None:
        (absmax,) = constants
    else:
        absmax = _double_dequantize(*constants, dq_block_size)
    return _dequantize(codes, absmax, shape, block_size, dtype)


class Linear4bit(nn.Module):
    """A frozen nn.Linear replacement with its weight in NF4 (QLoRA's base layer).

    Buffers (in state_dict, moved by .to(device)): codes uint8 (out*in/2,) and either absmax float32
    (out*in/block_size,) or, with double quantization, absmax_codes int8, absmax_scale float32,
    absmax_offset float32 (). There is no `weight` attribute on purpose: code that expects a dense,
    trainable weight should fail loudly; use dequantized_weight(dtype).

    The bias stays in full precision as an nn.Parameter with requires_grad=False rather than a buffer:
    it keeps nn.Linear's state_dict key and its place in .parameters() (so parameter counts and code
    that freezes / unfreezes parameters see it as before), and since it is added outside the custom
    Function, autograd gives it a gradient if someone does unfreeze it.

    Note: module.to(torch.bfloat16) would round the fp32 constants (absmax, scales) to bf16; cast the
    model before quantizing, and run mixed precision through autocast as the project does.
    """

    def __init__(self, in_features, out_features, bias=True, block_size=64, double_quant=True,
                 dq_block_size=256, device=None):
        super().__init__()
        n = in_features * out_features
        _check_blocks(n, block_size)
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.dq_block_size = dq_block_size if double_quant else None
        n_blocks = n // block_size
        # Zero-filled storage: a valid (all-zero) weight until from_linear or load_state_dict fills it.
        self.register_buffer("codes", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        if double_quant:
            n_scales = math.ceil(n_blocks / dq_block_size)
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.int8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(n_scales, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear, block_size=64, double_quant=True, dq_block_size=256):
        """Quantize an nn.Linear's weight (bias copied as is) into a new Linear4bit on the same device."""
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  block_size=block_size, double_quant=double_quant, dq_block_size=dq_block_size,
                  device=w.device)
        q = quantize_nf4(w, block_size=block_size, double_quant=False)
        out.codes.copy_(q["codes"])
        if double_quant:
            dq = double_quantize(q["absmax"], block_size=dq_block_size)
            out.absmax_codes.copy_(dq["codes"])
            out.absmax_scale.copy_(dq["scale"])
            out.absmax_offset.copy_(dq["offset"])
        else:
            out.absmax.copy_(q["absmax"])
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def _storage(self):
        if self.dq_block_size is None:
            return (self.absmax,)
        return (self.absmax_codes, self.absmax_scale, self.absmax_offset)

    def _meta(self, dtype):
        """What _weight_from_storage needs besides the tensors: shape, block sizes, compute dtype."""
        return (self.out_features, self.in_features), self.block_size, self.dq_block_size, dtype

    def dequantized_weight(self, dtype=torch.float32):
        """The weight the layer computes with, (out_features, in_features) in `dtype` (no grad)."""
        with torch.no_grad():
            return _weight_from_storage(self._meta(dtype), self.codes, self._storage())

    def forward(self, x):
        # Compute in x's dtype, or in the autocast dtype when autocast is on (what nn.Linear would get).
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = x.dtype
        y = _NF4LinearFunction.apply(x.to(dtype), self._meta(dtype), self.codes, *self._storage())  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self):
        n = self.in_features * self.out_features
        stored = nf4_bytes(n, self.dq_block_size is not None, self.block_size, self.dq_block_size or 256)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"double_quant={self.dq_block_size is not None}, weight_bytes={stored} (fp32: {4 * n})")


def quantize_linears_(module, should_quantize, block_size=64, double_quant=True):
    """Replace, in place, every nn.Linear below `module` for which should_quantize(qualified_name, linear)
    is True by Linear4bit.from_linear(linear). Returns how many were replaced.

    The caller picks the layers (PESC: the frozen attention and FFN projections only, never embeddings,
    LM head, norms, adapters, routers or LoRA factors). `module` itself is never replaced (it has no
    parent to hold the new layer). A Linear shared by two parents becomes one shared Linear4bit and
    counts once.
    """
    # Collect first, replace after: changing children while named_modules() walks them is unsafe.
    targets = [(name, m) for name, m in module.named_modules(remove_duplicate=False)
               if name and isinstance(m, nn.Linear) and should_quantize(name, m)]
    converted = {}  # id(linear) -> its Linear4bit
    for name, linear in targets:
        if id(linear) not in converted:
            converted[id(linear)] = Linear4bit.from_linear(linear, block_size=block_size,
                                                           double_quant=double_quant)
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, converted[id(linear)])
    return len(converted)
