"""
What a model costs to train: FLOPs per token and MFU (train.py's progress bar), and an estimate of a
training step's memory: weights, gradients, optimizer state and activations (compare.py --sizes).

    per_token = training_flops_per_token(count_params(model), n_layer, seq_len, d)
    mfu(per_token * tokens_per_second, "bfloat16")
"""

PEAK_FLOPS = {"bfloat16": 989e12, "float32": 494e12}   # H100/H200 SXM without sparsity: bf16, fp32 as TF32


def training_flops_per_token(counts, n_layer, seq_len, d_model):
    """FLOPs of one training token. Forward: 2 per active weight. Backward: the input gradients cost
    2 per active weight again (frozen layers included: the gradient must flow through them to reach
    the adapters and LoRA factors below), the weight gradients 2 per *trainable* weight only. So
    4 N_active + 2 N_trainable, not the 6 N of a full fine-tune. Plus attention's scores and
    weighted sum, QK^T and AV: 2 * 2 * T * d per layer forward, twice that backward = 12 L T d."""
    return 4 * counts["active"] + 2 * counts["trainable"] + 12 * n_layer * seq_len * d_model


def mfu(flops_per_second, dtype, peak_flops=0.0):
    """Model FLOPs utilisation: achieved FLOP/s over the GPU's peak for this dtype (or peak_flops)."""
    return flops_per_second / (peak_flops or PEAK_FLOPS[dtype])


BYTES = {"float32": 4, "bfloat16": 2}


def activation_bytes_per_token(config, checkpointing, adapter_columns, dtype_bytes=2):
    """A rough count of what backward keeps per token (bf16 activations): per block the normed inputs,
    q/k/v, the attention output, the FFN's hidden activations (SwiGLU: gate, up, their product; GPT-2:
    the 4d pre- and post-GELU) and the MoE adapters' pre-activations (adapter_columns: E*r on the
    masked path); with checkpointing only each block's input plus one block recomputed at a time.
    Plus the fp32 logits and their gradient."""
    d, f, kv = config.n_embd, config.ffn_dim, config.n_kv_head * config.head_dim
    per_block = (6 * d + 2 * kv + (3 if config.family == "llama" else 2) * f + adapter_columns) * dtype_bytes
    blocks = config.n_layer * d * dtype_bytes + per_block if checkpointing else config.n_layer * per_block
    return blocks + 2 * 4 * config.vocab_size


def training_memory(frozen_bytes, n_trainable, activation_bytes_per_token, tokens, trainable_dtype="float32"):
    """A training step's memory, roughly: the frozen weights, the trainable weights with their
    gradients and AdamW's two fp32 moments, and the activations kept for backward."""
    trainable = n_trainable * (2 * BYTES[trainable_dtype] + 8)
    return frozen_bytes + trainable + activation_bytes_per_token * tokens
