"""
Dense -> MoE upcycling: turn a dense GPT from model.py into what one of the tuning methods trains.

    model = GPT.from_pretrained("gpt2")
    upcycle(model, method="pesc", n_experts=8, top_k=2, adapter_dim=64, lora_rank=8)

method="pesc"     every chosen FFN becomes moe.PESCMoE: the FFN stays, frozen and shared; E zero-init
                  adapter experts and a router are added and trained.
method="sparse"   sparse upcycling (Komatsuzaki et al., 2022): E trainable copies of the FFN + router.
method="adapter"  the paper's baseline without experts, with adapters: one adapter after each FFN (PESC with
                  n_experts=1, top_k=1: the gate is always exactly 1, so the router is frozen).
method="lora"     the paper's baseline without experts, "Camel": no experts at all, only LoRA (use lora_targets="all").
(method="full", a full fine-tune of every weight, needs no upcycling: train.py just unfreezes the model.)

Every method computes exactly the dense model's function right after upcycling (adapters' W_up = 0,
LoRA's B = 0; FFN copies are identical and the gates sum to 1). Frozen afterwards: embeddings, norms,
the LM head, attention and, except in sparse upcycling, the FFNs; LoRA factors train where LoRA is on.

The paper's QLoRA recipe: quantize_base=True stores the frozen attention and FFN projections in 4-bit
NF4 (quant.py) before anything else is added; lora_targets="all" puts LoRA on them all, the shared FFN
included (one LoRA per projection, shared by every expert).
"""

import torch.nn as nn

from adapters import LoRALinear
from moe import PESCMoE, SparseUpcycledMoE, check_dispatch
from quant import Linear4bit, quantize_linears_

METHODS = ("pesc", "sparse", "adapter", "lora")
RENAMED_METHODS = {"dense": "full"}      # the spelling before "dense" meant only the model before upcycling
LAYER_CHOICES = ("all", "every_other")
LORA_TARGETS = ("attention", "all")


def upcycle(model, method="pesc", *, n_experts=8, top_k=2, adapter_dim=64, adapter_scale=1.0, adapter_dropout=0.0,
            layers="all", lora_rank=0, lora_alpha=16.0, lora_dropout=0.0, lora_targets="attention",
            aux_loss_coef=0.01, z_loss_coef=0.0, router_jitter=0.0, dispatch="auto", quantize_base=False,
            verbose=True):
    """Upcycles `model` in place and returns it. Its arguments are stored in model.upcycle_args so
    that a checkpoint can rebuild the same architecture."""
    args = dict(method=method, n_experts=n_experts, top_k=top_k, adapter_dim=adapter_dim,
                adapter_scale=adapter_scale, adapter_dropout=adapter_dropout, layers=layers, lora_rank=lora_rank,
                lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, router_jitter=router_jitter,
                dispatch=dispatch, quantize_base=quantize_base)
    check_args(model, args)
    dense_counts = count_params(model)
    if method == "adapter":
        n_experts, top_k = 1, 1
    blocks = model.transformer.h
    chosen = [] if method == "lora" else range(len(blocks)) if layers == "all" else range(1, len(blocks), 2)
    d = model.config.n_embd
    # the new tensors take the base's device and dtype: fp32 by default; a base loaded in bf16 trains
    # its adapters, routers and LoRA factors in bf16, as the official code does
    like = dict(device=model.transformer.wte.weight.device, dtype=model.transformer.wte.weight.dtype)
    moes = {}  # all built before the model is touched: bad sizes raise and leave it dense and trainable
    for i in chosen:
        ffn = blocks[i].mlp
        if method == "sparse":
            moes[i] = SparseUpcycledMoE(ffn, d, n_experts=n_experts, top_k=top_k, aux_loss_coef=aux_loss_coef,
                                        z_loss_coef=z_loss_coef, router_jitter=router_jitter, **like)
        else:
            moes[i] = PESCMoE(ffn, d, n_experts=n_experts, top_k=top_k, adapter_dim=adapter_dim,
                              adapter_scale=adapter_scale, adapter_dropout=adapter_dropout,
                              aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, router_jitter=router_jitter,
                              dispatch=dispatch, **like)
    if quantize_base:   # after the layers are built (they share the FFN modules): a bad size changed nothing
        quantize_frozen_projections(model)
    # freeze the base, then attach the new layers: their adapters, routers and (sparse) FFN copies were
    # created trainable, and a PESC layer's shared FFN, the base's own module, is frozen with the base
    model.requires_grad_(False)
    for i, moe in moes.items():
        blocks[i].mlp = moe
        moe.router.requires_grad_(n_experts > 1)   # one expert: the gate is softmax of one logit == 1
    if lora_rank > 0:
        for block in blocks:
            add_lora(block, lora_rank, lora_alpha, lora_dropout, lora_targets, like["dtype"])
    model.upcycle_args = args
    if verbose:
        print_param_table(dense_counts, count_params(model), method, n_experts, top_k)
    return model


def check_args(model, args):
    method = args["method"]
    if method in RENAMED_METHODS:
        raise ValueError(f"method={method!r} was renamed: use method={RENAMED_METHODS[method]!r} (a full fine-tune "
                         f"needs no upcycling)")
    if method not in METHODS:
        raise ValueError(f"unknown upcycling method {method!r}; choose one of {METHODS}")
    if args["layers"] not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {args['layers']!r}")
    if args["lora_targets"] not in LORA_TARGETS:
        raise ValueError(f"lora_targets must be one of {LORA_TARGETS}, got {args['lora_targets']!r}")
    rank = args["lora_rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0 (0 = no LoRA), got {rank!r}")
    if method == "lora" and rank == 0:
        raise ValueError("method='lora' trains only LoRA factors: set lora_rank > 0")
    if method == "sparse" and (args["quantize_base"] or args["lora_targets"] == "all"):
        raise ValueError("sparse upcycling trains whole FFN copies in full precision: it takes neither "
                         "quantize_base=True nor LoRA on the FFN (lora_targets='all')")
    check_dispatch(args["dispatch"])
    if model.upcycle_args is not None or model.moe_layers():
        raise ValueError("this model is already upcycled; upcycle a dense GPT (for example a freshly "
                         "loaded base checkpoint)")


def linear_children(module):
    """(name, layer) of a module's direct linear children (nn.Linear, or 4-bit Linear4bit)."""
    return [(name, child) for name, child in module.named_children() if isinstance(child, (nn.Linear, Linear4bit))]


def add_lora(block, rank, alpha, dropout, targets, dtype):
    """LoRA on the block's attention projections (GPT-2 c_attn, c_proj; Llama q, k, v, o), and with
    targets="all" on its FFN's too (c_fc, c_proj; gate, up, down), the shared FFN inside a PESC layer."""
    owners = [block.attn]
    if targets == "all":
        owners.append(block.mlp.ffn if isinstance(block.mlp, PESCMoE) else block.mlp)
    for owner in owners:
        for name, layer in linear_children(owner):
            setattr(owner, name, LoRALinear(layer, rank, alpha, dropout, dtype=dtype))


def quantize_frozen_projections(model):
    """4-bit NF4 for the frozen attention and FFN projections (never embeddings, LM head, norms or
    anything trainable): the QLoRA base. Deterministic, so a checkpoint redoes it on load."""
    for block in model.transformer.h:
        for owner in (block.attn, block.mlp):
            quantize_linears_(owner, lambda name, layer: True)


def count_params(model):
    """total, trainable and active-per-token parameter counts (tied weights counted once; a 4-bit
    weight counts as its number of weights). Active: what one token touches: everything except
    the E - k experts it is not routed to."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inactive = sum((moe.n_experts - moe.top_k) * moe.params_per_expert() for moe in model.moe_layers())
    return dict(total=total, trainable=trainable, active=total - inactive)


def print_param_table(dense, tuned, method, n_experts, top_k):
    """The dense model is counted as fully fine-tuned: trainable = total."""
    dense = dict(dense, trainable=dense["total"])
    print(f"upcycled with {method}: {n_experts} experts, top-{top_k}" if method in ("pesc", "sparse")
          else f"prepared for {method} tuning (no experts)" if method == "lora" else "one adapter per FFN")
    print(f"{'parameters':<12}{'dense':>14}{method:>14}{'ratio':>9}")
    for key in ("total", "trainable", "active"):
        print(f"{key:<12}{dense[key]:>14,}{tuned[key]:>14,}{tuned[key] / dense[key]:>9.3f}")

