"""
The dense model PESC starts from: one compact GPT class for two families, in the nanoGPT mould.

  family="gpt2"   GPT-2 (Radford et al., 2019): LayerNorm, learned positions, q/k/v in one matmul
                  (c_attn), a GELU FFN d -> 4d -> d (c_fc, c_proj), tied output embeddings.
  family="llama"  the Llama family (Llama-2/3, SmolLM2, Qwen2/2.5): RMSNorm, rotary position
                  embeddings (RoPE, rotate-half convention, optional "llama3" frequency scaling),
                  grouped-query attention (n_kv_head), optional q/k/v biases (Qwen2), a SwiGLU FFN
                  down(silu(gate(x)) * up(x)), tied or untied output embeddings.

Each Block's FFN (`block.mlp`) is a separate module, so upcycle.py can swap it for an MoE layer from
moe.py. Nothing else here knows about experts, except how their routing travels (below).

How routing statistics and the aux loss travel -- the one channel, explicit in the return values:
  an MoE layer returns (y, (aux_loss, counts, indices)); Block.forward passes that triple up;
  GPT.forward stacks the triples of all MoE layers into one `Routing` (aux loss summed over layers,
  counts (layers, E), indices (layers, N, k)) and returns it as its third value (None for a model
  without MoE layers). train.py adds routing.aux_loss to the cross-entropy before backward and sums
  routing.counts for the logged expert load; evaluate.py sums the counts over a split; sample.py
  --show_experts reads routing.indices. No module keeps state about the last forward.

Padding: a batch of instruction examples is right-padded to its longest row (data/instruct.py,
collate). Given the token_mask, GPT.forward drops the padding positions once, after the embeddings:
every per-token layer (norms, projections, the FFN or MoE layer, the LM head) then runs on the real
tokens only, (N_real, d) -- on the default run ~30 % of the positions are padding. Only attention
needs the (B, T) layout back: it scatters q, k, v into it (Unpadded.pad) and gathers its output
again. Right padding and the causal mask keep every real token's result exactly what it is in the
padded batch, and the MoE layers see only real tokens, so padding never enters the aux loss or counts.
Generation takes prompts of different lengths the same way, right-padded: after the prefill the KV
cache keeps each row's own length, so every row goes on from its own last token (KVCache).

References: nanoGPT (karpathy/nanoGPT); gpt-fast (pytorch-labs/gpt-fast) for the KV cache; the
Hugging Face Llama / Qwen2 modeling files for RoPE's rotate-half layout and llama3 scaling.
Loading Hugging Face checkpoints lives in pretrained.py (GPT.from_pretrained calls it).

    model = GPT.from_pretrained("gpt2")                     # or "HuggingFaceTB/SmolLM2-135M", a folder
    logits, loss, routing = model(idx, targets)             # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=32, temperature=0)   # with a KV cache
    out = model.generate(idx, 32, temperature=0, token_mask=mask) # prompts of different lengths, right-padded
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

FAMILIES = ("gpt2", "llama")
ROPE_TYPES = ("default", "llama3")


@dataclass
class GPTConfig:
    block_size: int = 1024       # longest sequence the model handles (learned positions / RoPE table)
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    family: str = "gpt2"         # "gpt2" | "llama"
    bias: bool = True            # GPT-2: biases in every Linear and LayerNorm (Llama: none)
    gelu: str = "none"           # GPT-2 FFN: "none" = exact erf GELU; "tanh" = GPT-2's approximation
    n_kv_head: int = 0           # grouped-query attention: key/value heads (0 = n_head)
    ffn_dim: int = 0             # FFN hidden width (0 = 4 * n_embd)
    qkv_bias: bool = False       # Llama family: biases on q, k, v only (Qwen2)
    norm_eps: float = 1e-5       # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0
    rope_scaling: dict = None    # None, or Hugging Face's {"rope_type": "llama3", "factor": ..., ...}
    tie_embeddings: bool = True  # the output head shares the token embedding matrix

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("grouped-query attention (n_kv_head < n_head) is a Llama-family feature")
        if self.ffn_dim == 0:
            self.ffn_dim = 4 * self.n_embd
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' or 'tanh', got {self.gelu!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope scaling {kind!r} is not supported; supported: {ROPE_TYPES} "
                                 f"(linear, dynamic and yarn scalings are not implemented)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# -----------------------------------------------------------------------------
# the pieces of the Llama family: RMSNorm and rotary position embeddings

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as the Llama reference does."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(head_dim, theta, scaling=None):
    """inv_freq (head_dim/2,): the rotation speed of each pair of channels, theta^(-2i/head_dim).
    Llama-3's "llama3" scaling stretches the slow (long-wavelength) frequencies by `factor` so the
    model reaches a longer context, keeps the fast ones, and blends linearly in between."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)                      # 0 at the slow end, 1 at the fast end
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,      # slow: stretched
                               torch.where(wavelen < old_len / high, inv_freq, blended))  # fast: kept
    return inv_freq.float()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE as in the Hugging Face checkpoints: channel i is paired with i + hs/2.
    x (B, nh, T, hs); cos, sin (T, hs) = cos/sin of position * inv_freq, repeated twice."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# the KV cache for generation

class KVCache:
    """Keys and values of every layer for the positions fed so far (gpt-fast's KVCache, one object
    for all layers). Generation feeds the prompts once (prefill), then one token per step. Prompts of
    different lengths are prefilled together, right-padded (GPT.forward's token_mask); from then on
    each row goes on from its own length: row b writes the k, v of its new tokens at positions
    [lengths[b], lengths[b] + T), and its queries see the cached keys up to their own position. The
    padding a short prompt left in the cache is overwritten by that row's new tokens, and no query
    ever sees it before. The buffers are allocated on the first write, in the dtype of k and v."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.length = 0                    # positions written in the longest row (a host int: no GPU sync)
        self.lengths = None                # (B,) int64 on the model's device: positions cached in each row
        self.k = [None] * n_layer          # per layer (B, n_kv_head, max_len, hs)
        self.v = [None] * n_layer
        self.positions = self.mask = None  # of the tokens being fed: set by begin()

    def begin(self, B, T, device):
        """Called by GPT.forward before the blocks: returns the (B, T) positions of the tokens fed now,
        and sets the attention mask all layers share, (B, 1, T, length + T): which keys each of them
        sees (None while the cache is empty: the prefill's plain causal mask)."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length + T} asked")
        if self.lengths is None:
            self.lengths = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = self.lengths[:, None] + torch.arange(T, device=device)      # (B, T)
        self.mask = None
        if self.length > 0:
            keys = torch.arange(self.length + T, device=device)
            self.mask = (keys <= self.positions[:, :, None])[:, None]                 # (B, 1, T, length + T)
        return self.positions

    def update(self, layer, k, v):
        """k, v (B, n_kv_head, T, hs) of the tokens fed now -> all keys and values so far,
        (B, n_kv_head, length + T, hs)."""
        if self.k[layer] is None:
            B, nkv, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nkv, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nkv, self.max_len, hs)
        where = self.positions[:, None, :, None].expand_as(k)        # row b's tokens go to its own positions
        self.k[layer].scatter_(2, where, k)
        self.v[layer].scatter_(2, where, v)
        end = self.length + k.size(2)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T, real_lengths=None):
        """Called by GPT.forward after the blocks: every row holds T more positions, or, after a
        right-padded prefill, as many as its real tokens (real_lengths, Unpadded.lengths)."""
        self.length += T
        if real_lengths is None:
            self.lengths = self.lengths + T
        else:
            self.lengths = real_lengths.to(self.lengths.device)


# -----------------------------------------------------------------------------
# the blocks

class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        d, hs = config.n_embd, config.head_dim
        self.fused_qkv = config.family == "gpt2"
        if self.fused_qkv:   # GPT-2 stores q, k, v as one (d -> 3d) projection
            self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)
            self.c_proj = nn.Linear(d, d, bias=config.bias)
        else:                # Llama family: separate projections, k and v with n_kv_head heads
            self.q_proj = nn.Linear(d, config.n_head * hs, bias=config.qkv_bias)
            self.k_proj = nn.Linear(d, config.n_kv_head * hs, bias=config.qkv_bias)
            self.v_proj = nn.Linear(d, config.n_kv_head * hs, bias=config.qkv_bias)
            self.o_proj = nn.Linear(config.n_head * hs, d, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, unpadded=None):
        """x (B, T, C), or (N_real, C) with `unpadded` (see the top of the file)."""
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        if self.fused_qkv:
            q, k, v = self.c_attn(x).split(x.size(-1), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if unpadded is not None:   # projected per real token; attention works on the (B, T) layout
            q, k, v = unpadded.pad(q), unpadded.pad(k), unpadded.pad(v)
        B, T = q.shape[:2]
        q = q.view(B, T, nh, hs).transpose(1, 2)    # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)   # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)   # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)   # (B, nkv, length + T, hs)
            mask = cache.mask                           # None on the prefill: plain causal
        if nkv != nh:  # grouped-query attention: each k/v head serves nh / nkv query heads
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)   # (B, T, nh * hs)
        if unpadded is not None:
            y = unpadded.unpad(y)                                 # (N_real, nh * hs)
        return self.resid_dropout(self.c_proj(y) if self.fused_qkv else self.o_proj(y))


class MLP(nn.Module):
    """GPT-2's FFN: d -> 4d -> d with GELU. PESC keeps this module, frozen, inside every expert."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu = config.gelu

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu)))


class SwiGLU(nn.Module):
    """The Llama family's FFN: down(silu(gate(x)) * up(x)). In PESC the whole of it (gate, up and
    down) is the shared, frozen expert body, as in the official Camelidae code."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


DENSE_FFNS = (MLP, SwiGLU)   # what block.mlp is before upcycling; anything else is an MoE layer


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        if config.family == "gpt2":
            self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
            self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        else:
            self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
            self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config) if config.family == "gpt2" else SwiGLU(config)   # upcycle.py swaps it

    def forward(self, x, rope=None, unpadded=None, cache=None):
        """Returns (x, routing): routing is the MoE layer's (aux_loss, counts, indices), or None."""
        x = x + self.attn(self.ln_1(x), rope, cache, unpadded)
        h = self.ln_2(x)  # the router and the FFN both read the FFN input
        if isinstance(self.mlp, DENSE_FFNS):
            return x + self.mlp(h), None
        y, routing = self.mlp(h)
        return x + y, routing


class Unpadded:
    """Where the real tokens of a right-padded (B, T) batch sit: rows, their flat positions b * T + t."""

    def __init__(self, token_mask, device):
        self.B, self.T = token_mask.shape
        # computed where the mask lives: train.py keeps it on the host, so a GPU never waits
        self.rows = token_mask.reshape(-1).nonzero().squeeze(1).to(device, non_blocking=True)
        self.lengths = token_mask.sum(1)   # real tokens per row, where the mask lives

    def last_tokens(self):
        """Where each row's last real token sits among the N_real: the position generation predicts from."""
        if (self.lengths == 0).any():
            raise ValueError("a row of token_mask has no real token: there is nothing to predict from")
        return (self.lengths.cumsum(0) - 1).to(self.rows.device, non_blocking=True)

    def unpad(self, t):
        """(B, T, ...) -> (N_real, ...)"""
        return t.reshape(self.B * self.T, *t.shape[2:]).index_select(0, self.rows)

    def pad(self, t):
        """(N_real, C) -> (B, T, C), zeros at the padding positions"""
        return t.new_zeros(self.B * self.T, t.size(-1)).index_copy(0, self.rows, t).view(self.B, self.T, -1)


def check_token_mask(token_mask, idx):
    """A token_mask must have idx's shape and mark right padding (checked where the mask lives)."""
    if token_mask.shape != idx.shape:
        raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}; it must match idx, {tuple(idx.shape)}")
    if (token_mask[:, 1:] & ~token_mask[:, :-1]).any():
        raise ValueError("token_mask must mark right padding: each row's real tokens first, then padding "
                         "(with left padding, causal attention would let real tokens see the padding)")


@dataclass
class Routing:
    """What the MoE layers of one forward report (see the top of this file)."""
    aux_loss: torch.Tensor   # scalar: the sum over MoE layers of alpha * Eq. 10 (+ z-loss); part of the training loss
    counts: torch.Tensor     # (n_moe_layers, E) int64: (token, slot) assignments per expert, real tokens only
    indices: torch.Tensor    # (n_moe_layers, N, k): the experts each token (real tokens, in order) was routed to


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd), drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]))
        if config.family == "gpt2":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
            modules["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        else:
            modules["ln_f"] = RMSNorm(config.n_embd, config.norm_eps)
            self.register_buffer("rope_inv_freq", rope_inverse_frequencies(
                config.head_dim, config.rope_theta, config.rope_scaling), persistent=False)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.upcycle_args = None  # set by upcycle.upcycle(); saved in checkpoints to rebuild the MoE
        self.gradient_checkpointing = False   # train.py's setting: recompute each block in backward
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                # GPT-2's scaled init of the projections that write into the residual stream
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rope(self, positions, dtype):
        """(cos, sin) for positions (T,) or, with the KV cache, (B, T): each (T, head_dim) or
        (B, 1, T, head_dim), to broadcast over the heads; computed in fp32, then cast."""
        freqs = positions.float()[..., None] * self.rope_inv_freq     # (..., T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)                       # (..., T, hs)
        if emb.dim() == 3:
            emb = emb[:, None]                                        # (B, 1, T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx, targets=None, token_mask=None, cache=None):
        """idx, targets: (B, T) int64; targets == -1 is ignored (prompt and padding positions).
        token_mask: (B, T) bool, False on padding (right padding): the padding positions are dropped after
        the embeddings (see the top of the file); their logits come back as zeros. On any device.
        cache: a KVCache (generation); idx then holds the tokens after those already cached, each
        row going on from its own length (a token_mask only on the prefill, while the cache is empty).
        Returns (logits, loss, routing). With targets: logits of every position and loss = mean
        cross-entropy (the MoE aux loss is NOT in it: it is routing.aux_loss, for the caller to add).
        Without targets: logits of each row's last (real) token only, (B, 1, vocab), and loss None.
        routing: see Routing."""
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        if cache is None:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)   # (T,)
        else:
            if token_mask is not None and start > 0:
                raise ValueError("a token_mask with a KV cache is for the prefill only (an empty cache)")
            pos = cache.begin(B, T, idx.device)                          # (B, T)
        x = self.transformer.wte(idx)                                    # (B, T, C)
        rope = None
        if self.config.family == "gpt2":
            x = x + self.transformer.wpe(pos)
        else:
            rope = self.rope(pos, x.dtype)   # in the embeddings' dtype, as the Hugging Face models do
        x = self.transformer.drop(x)
        unpadded = None
        if token_mask is not None:
            check_token_mask(token_mask, idx)
            unpadded = Unpadded(token_mask, x.device)
            x = unpadded.unpad(x)                                        # (N_real, C)
        per_layer = []
        for block in self.transformer.h:
            x, routing = self.run_block(block, x, rope, unpadded, cache)
            if routing is not None:
                per_layer.append(routing)
        if cache is not None:
            cache.advance(T, None if unpadded is None else unpadded.lengths)
        x = self.transformer.ln_f(x)
        routing = None
        if per_layer:
            aux, counts, indices = zip(*per_layer)
            routing = Routing(aux_loss=torch.stack(aux).sum(), counts=torch.stack(counts), indices=torch.stack(indices))
        if targets is None:
            x = x[:, [-1], :] if unpadded is None else x.index_select(0, unpadded.last_tokens())[:, None]
            return self.lm_head(x), None, routing                 # (B, 1, vocab)
        logits = self.lm_head(x)                                   # (B, T, vocab), or (N_real, vocab)
        targets = targets.reshape(-1) if unpadded is None else unpadded.unpad(targets)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets, ignore_index=-1)
        if unpadded is not None:
            logits = unpadded.pad(logits)                          # (B, T, vocab)
        return logits, loss, routing

    def run_block(self, block, x, rope, unpadded, cache):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # keep only the block's input; its activations are recomputed during backward
            # (non-reentrant: works with the frozen weights and the MoE layers' extra outputs)
            return torch.utils.checkpoint.checkpoint(block, x, rope, unpadded, cache, use_reentrant=False)
        return block(x, rope, unpadded, cache)

    def moe_layers(self):
        """The MoE layers in depth order (empty for a dense model)."""
        return [block.mlp for block in self.transformer.h if not isinstance(block.mlp, DENSE_FFNS)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, n_vocab=None, use_cache=True,
                 token_mask=None):
        """Autoregressive sampling; temperature 0 means greedy. idx (B, T): the prompts; prompts of
        different lengths come right-padded, with token_mask (B, T) bool, False on padding (kept on
        the host, as for forward). With use_cache: one prefill over the prompts, then one token per
        step through every layer (an MoE layer routes only the new tokens). Once a row outgrows
        block_size, every step runs on each row's last block_size tokens without the cache, exactly as
        nanoGPT's crop does, so a greedy answer never depends on use_cache or on the other rows of
        the batch (up to float rounding; sampled ones share the random draws). Rows that produced
        eos_id keep emitting it; generation stops once every row has. n_vocab: the tokenizer's size;
        ids above it (vocab_size is rounded up) are never sampled.
        Returns (B, T + n), n <= max_new_tokens: row b holds its prompt, its n new tokens at columns
        [length_b, length_b + n), then what is left of idx's padding and zeros (not a pad id)."""
        B, T = idx.shape
        bs = self.config.block_size
        if token_mask is not None:
            check_token_mask(token_mask, idx)
        # each row's length, twice: host ints (the crop windows: no GPU sync) and on the device (where
        # each row's next token goes); the cache keeps its own copy of the cached part
        lengths = [T] * B if token_mask is None else token_mask.sum(1).tolist()
        if min(lengths, default=0) == 0:
            raise ValueError("generate needs at least one prompt token in every row")
        seq = torch.cat((idx, idx.new_zeros(B, max_new_tokens)), dim=1)
        next_column = torch.tensor(lengths, device=idx.device)[:, None]          # (B, 1)
        cache = KVCache(self.config.n_layer, min(T + max_new_tokens, bs)) if use_cache and T <= bs else None
        if cache is not None:
            logits, _, _ = self(idx, token_mask=token_mask, cache=cache)
        else:
            window, mask = last_window(seq, lengths, bs)
            logits, _, _ = self(window, token_mask=mask)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step = -1                                                                # max_new_tokens = 0: the prompts alone
        for step in range(max_new_tokens):
            idx_next = pick_next_token(logits[:, -1, :].float(), temperature, top_k, n_vocab)   # (B, 1)
            if eos_id is not None:
                idx_next = torch.where(finished[:, None], torch.full_like(idx_next, eos_id), idx_next)
                finished |= idx_next[:, 0] == eos_id
            seq.scatter_(1, next_column + step, idx_next.to(seq.dtype))
            lengths = [n + 1 for n in lengths]
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            if cache is not None and cache.length < bs:
                logits, _, _ = self(idx_next, cache=cache)     # only the new tokens
            else:
                cache = None                                   # past block_size: the cropped windows
                window, mask = last_window(seq, lengths, bs)
                logits, _, _ = self(window, token_mask=mask)
        return seq[:, :T + step + 1]

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, dropout=0.0, cache_dir=None):
        """Hugging Face checkpoints without transformers: GPT-2 ("gpt2", "gpt2-medium", ...) and the
        Llama family (a repo id such as "HuggingFaceTB/SmolLM2-135M" or "Qwen/Qwen2.5-0.5B", downloaded
        once into the cache), a local folder, or a GPT-2 weights file. dtype: e.g. torch.bfloat16 to
        halve the memory (default fp32). The loading code is in pretrained.py."""
        from pretrained import load_pretrained   # here: pretrained.py imports this file
        return load_pretrained(name_or_path, dtype=dtype, dropout=dropout, cache_dir=cache_dir)


def last_window(seq, lengths, block_size):
    """Each row's last min(length, block_size) tokens of seq (B, >= max(lengths)), right-padded, and
    their token_mask (None when no row needs padding): what generation feeds without the cache."""
    lengths = torch.tensor(lengths)
    starts = (lengths - block_size).clamp(min=0)
    width = int((lengths - starts).max())
    columns = starts[:, None] + torch.arange(width)               # (B, width), on the host
    mask = columns < lengths[:, None]
    columns = torch.minimum(columns, lengths[:, None] - 1)        # padding repeats a real token: masked anyway
    return seq.gather(1, columns.to(seq.device)), None if bool(mask.all()) else mask


def pick_next_token(logits, temperature, top_k, n_vocab):
    """logits (B, vocab) fp32 -> (B, 1) next ids: greedy at temperature 0, else sampled from the
    softmax of logits / temperature restricted to the top_k largest. Ids >= n_vocab never come out."""
    if n_vocab is not None:
        logits[:, n_vocab:] = -float("inf")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
