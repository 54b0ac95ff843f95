"""
Dense -> MoE upcycling: turn a dense GPT from model.py into a PESC (or sparse-upcycled) MoE GPT.

    model = GPT.from_pretrained("gpt2")
    upcycle(model, method="pesc", n_experts=8, top_k=2, adapter_dim=64, lora_rank=8)

method="pesc"   every chosen FFN becomes moe.PESCMoE: the FFN stays, frozen and shared; E zero-init
                adapter experts and a router are added and trained (PESC Sec. 3).
method="sparse" sparse upcycling (Komatsuzaki et al., 2022): E trainable copies of the FFN + router.
The dense baseline of the paper ("Camel": same data, same parameter-efficient recipe, no experts) is
PESC with n_experts=1, top_k=1: one adapter after each FFN, whose gate is always 1.

Both methods compute exactly the dense model's function right after upcycling (adapters' W_up = 0;
FFN copies are identical and the gates sum to 1). Frozen afterwards: embeddings, norms, attention
(unless LoRA is on, then only the LoRA factors train), and in PESC the FFNs.
"""

from adapters import LoRALinear
from model import MLP
from moe import PESCMoE, SparseUpcycledMoE

METHODS = ("pesc", "sparse")
LAYER_CHOICES = ("all", "every_other")


def upcycle(model, method="pesc", n_experts=8, top_k=2, adapter_dim=64, adapter_scale=1.0,
            adapter_dropout=0.0, layers="all", lora_rank=0, lora_alpha=16.0, lora_dropout=0.0,
            aux_loss_coef=0.01, z_loss_coef=0.0, router_jitter=0.0, dispatch="dense", verbose=True):
    """Upcycles `model` in place and returns it. Its arguments are stored in model.upcycle_args so
    that a checkpoint can rebuild the same architecture."""
    args = dict(method=method, n_experts=n_experts, top_k=top_k, adapter_dim=adapter_dim,
                adapter_scale=adapter_scale, adapter_dropout=adapter_dropout, layers=layers,
                lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, router_jitter=router_jitter,
                dispatch=dispatch)
    if method not in METHODS:
        raise ValueError(f"unknown upcycling method {method!r}; choose one of {METHODS} "
                         f"(the dense baseline is method='pesc' with n_experts=1, top_k=1)")
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0 (0 = no LoRA), got {lora_rank!r}")
    if model.upcycle_args is not None or model.moe_layers():
        raise ValueError("this model is already upcycled; upcycle a dense GPT (for example a freshly "
                         "loaded base checkpoint)")
    dense_counts = count_params(model)

    d = model.config.n_embd
    blocks = model.transformer.h
    chosen = range(len(blocks)) if layers == "all" else range(1, len(blocks), 2)
    moes = {}  # all built before the model is touched: bad sizes raise and leave it dense and trainable
    for i in chosen:
        ffn = blocks[i].mlp
        assert isinstance(ffn, MLP)
        if method == "pesc":
            moes[i] = PESCMoE(ffn, d, n_experts, top_k, adapter_dim, adapter_scale, adapter_dropout,
                              aux_loss_coef, z_loss_coef, router_jitter, dispatch)
        else:
            moes[i] = SparseUpcycledMoE(ffn, d, n_experts, top_k, aux_loss_coef, z_loss_coef, router_jitter)
    model.requires_grad_(False)
    for i, moe in moes.items():
        moe.experts.requires_grad_(True)
        # with one expert the gate is softmax of one logit == 1: the router has nothing to learn
        moe.router.requires_grad_(n_experts > 1)
        device, dtype = blocks[i].mlp.c_fc.weight.device, blocks[i].mlp.c_fc.weight.dtype
        blocks[i].mlp = moe.to(device=device, dtype=dtype)
    if lora_rank > 0:
        for block in blocks:  # PESC tunes attention with LoRA next to the experts
            block.attn.c_attn = LoRALinear(block.attn.c_attn, lora_rank, lora_alpha, lora_dropout)
            block.attn.c_proj = LoRALinear(block.attn.c_proj, lora_rank, lora_alpha, lora_dropout)
    model.upcycle_args = args
    if verbose:
        print_param_table(dense_counts, count_params(model), method, n_experts, top_k)
    return model


def count_params(model):
    """total, trainable and active-per-token parameter counts (tied weights counted once).
    Active: what one token touches: everything except the E - k experts it is not routed to."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inactive = 0
    for moe in model.moe_layers():
        per_expert = sum(p.numel() for p in moe.experts[0].parameters())
        inactive += (moe.n_experts - moe.top_k) * per_expert
    return dict(total=total, trainable=trainable, active=total - inactive)


def print_param_table(dense, moe, method, n_experts, top_k):
    """The dense model is counted as fully fine-tuned: trainable = total."""
    dense = dict(dense, trainable=dense["total"])
    print(f"upcycled with {method}: {n_experts} experts, top-{top_k}")
    print(f"{'parameters':<12}{'dense':>14}{method:>14}{'ratio':>9}")
    for key in ("total", "trainable", "active"):
        print(f"{key:<12}{dense[key]:>14,}{moe[key]:>14,}{moe[key] / dense[key]:>9.3f}")
