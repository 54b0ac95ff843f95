"""
The two parameter-efficient building blocks PESC uses.

Adapter     - the bottleneck adapter of Houlsby et al. (2019) that PESC turns into an expert:
              delta(u) = s * W_up · GELU(W_down · u), so that A(u) = u + delta(u)  (PESC Eq. 6/7).
              W_up starts at zero, so a fresh adapter is the identity: A(u) = u.
LoRALinear  - a frozen nn.Linear plus a low-rank update (Hu et al., 2021):
              y = W x + b + (alpha / r) * B · A · dropout(x), with B = 0 at init.
              PESC tunes the attention projections with (Q)LoRA next to the adapter experts.

Both are plain nn.Modules with no knowledge of routing; moe.py builds the experts from Adapter
and upcycle.py wraps the attention projections in LoRALinear.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Adapter(nn.Module):
    """Bottleneck adapter d -> r -> d. forward() returns only the residual branch delta(u);
    the caller adds u (in PESC the shared FFN output) once, however many adapters it mixes."""

    def __init__(self, d_model, rank, scale=1.0, dropout=0.0):
        super().__init__()
        if d_model <= 0 or rank <= 0:
            raise ValueError(f"Adapter sizes must be positive, got d_model={d_model}, rank={rank}")
        self.scale = scale
        self.down = nn.Linear(d_model, rank, bias=False)   # W_down: d -> r
        self.up = nn.Linear(rank, d_model, bias=False)     # W_up:   r -> d
        self.dropout = nn.Dropout(dropout)
        self.up.ZERO_INIT = True  # marker: GPT._init_weights and reset_parameters() keep this at zero
        self.reset_parameters()

    def reset_parameters(self):
        # W_down like nn.Linear's default; W_up = 0 makes the adapter start as the identity,
        # which is what makes upcycling function-preserving (PESC.md, "Init").
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, u):
        # exact (erf) GELU, as in the official PESC code; GPT-2's own FFN uses the tanh form
        return self.scale * self.up(F.gelu(self.down(self.dropout(u))))


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear `base` and adds (alpha / rank) * B A x. merge() folds the update into
    base.weight for inference; unmerge() takes it out again (both exact up to float rounding)."""

    def __init__(self, base: nn.Linear, rank, alpha=16.0, dropout=0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B.ZERO_INIT = True
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
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False
