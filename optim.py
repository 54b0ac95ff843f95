"""
The optimizer and its learning-rate schedule, shared by train.py (pretraining and tuning) and
bench.py (timed training steps).

    optimizer = make_optimizer(model, lr=2e-4, weight_decay=0.0, device_type="cuda")
    lr = lr_at(step, total_steps, peak_lr, warmup_frac=0.03, min_ratio=0.1)
"""

import math

import torch


def make_optimizer(model, lr, weight_decay, device_type):
    """AdamW over the trainable parameters; weight decay on matrices only, never on norms, biases or
    routers (a router's weights set the routing, not a feature; decaying them pulls every expert's
    logit toward the others)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and ".router." not in name else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel over all tensors instead of a loop over them (PESC has many small ones);
    # on the CPU since torch 2.4
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device_type in ("cuda", "cpu"))


def lr_at(step, total, peak, warmup_frac, min_ratio):
    """Linear warmup over warmup_frac of the steps, then cosine decay to peak * min_ratio."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
