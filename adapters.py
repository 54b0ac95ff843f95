"""
The two parameter-efficient building blocks PESC uses.

Adapter     - the bottleneck adapter of Houlsby et al. (2019) that PESC turns into an expert:
              A(u) = u + s * W_up · GELU(W_down · u), with W_down: d -> r, W_up: r -> d, no biases.
              W_up starts at zero, so a fresh adapter is the identity: A(u) = u.
              moe.PESCMoE stores E of them stacked in two tensors (one matmul serves all experts);
              this class is the readable definition of one, and PESCMoE.expert(i) returns expert i as one.
LoRALinear  - a frozen linear layer plus a low-rank update (Hu et al., 2021):
              y = W x + b + (alpha / r) * B · A · dropout(x), with B = 0 at init.
              PESC tunes the attention projections (and, in the paper's recipe, the shared FFN's
              projections too) with (Q)LoRA next to the adapter experts; the frozen layer may be a
              4-bit quant.Linear4bit.

Both are plain nn.Modules with no knowledge of routing.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Adapter(nn.Module):
    """Bottleneck adapter d -> r -> d: forward(u) = A(u) = u + delta(u)."""

    def __init__(self, d_model, rank, scale=1.0, dropout=0.0):
        super().__init__()
        if d_model <= 0 or rank <= 0:
            raise ValueError(f"Adapter sizes must be positive, got d_model={d_model}, rank={rank}")
        self.scale = scale
        self.down = nn.Linear(d_model, rank, bias=False)   # W_down: d -> r
        self.up = nn.Linear(rank, d_model, bias=False)     # W_up:   r -> d
        self.dropout = nn.Dropout(dropout)                 # before W_down, as the official PESC code
        self.reset_parameters()

    def reset_parameters(self):
        # W_down like nn.Linear's default; W_up = 0 makes the adapter start as the identity,
        # which is what makes upcycling function-preserving
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def delta(self, u):
        """The residual branch s * W_up · GELU(W_down · u) alone (exact erf GELU, as the official code)."""
        return self.scale * self.up(F.gelu(self.down(self.dropout(u))))

    def forward(self, u):
        return u + self.delta(u)


class LoRALinear(nn.Module):
    """Wraps a frozen linear layer `base` (nn.Linear or quant.Linear4bit) and adds (alpha / rank) B A x.
    merge() folds the update into base.weight for inference; unmerge() takes it out again (both exact up
    to float rounding; not for a 4-bit base, whose weight is not a tensor one can add to)."""

    def __init__(self, base, rank, alpha=16.0, dropout=0.0, dtype=None):
        super().__init__()
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise ValueError(f"LoRALinear wraps a linear layer, got {type(base).__name__}")
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        # the factors live where the base does, in its dtype (a 4-bit base has none: the given dtype, or fp32)
        if isinstance(base, nn.Linear):
            device, dtype = base.weight.device, dtype or base.weight.dtype
        else:
            device, dtype = base.codes.device, dtype or torch.get_default_dtype()
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self):
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        if not isinstance(self.base, nn.Linear):
            raise ValueError(f"cannot merge LoRA into a {type(self.base).__name__}: only into an nn.Linear")
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False
