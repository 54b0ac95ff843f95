"""
A compact GPT (GPT-2 architecture) in the nanoGPT mould, and a loader for real GPT-2 weights.

This is the *dense* model that PESC starts from. Each Block's FFN (`block.mlp`) is a separate module
so that upcycle.py can swap it for an MoE layer from moe.py; an MoE layer also returns its auxiliary
(load-balancing) loss, and GPT.forward adds those up. Nothing else here knows about experts.

References: nanoGPT (karpathy/nanoGPT, model.py); GPT-2 (Radford et al., 2019); the Hugging Face
GPT-2 checkpoint layout (Conv1D weights stored as (in, out), hence the transposes in the loader).

    model = GPT.from_pretrained("gpt2")              # or a local dir / .bin / .safetensors file
    logits, loss = model(idx, targets)               # idx, targets: (B, T) int64
"""

import json
import math
import os
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304   # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True         # biases in Linear layers and LayerNorms, as GPT-2
    gelu: str = "none"        # "none" = exact erf GELU; "tanh" = GPT-2's approximation ("gelu_new")

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' or 'tanh', got {self.gelu!r}")


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The dense FFN: d -> 4d -> d. PESC keeps this module, frozen, inside every expert."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu = config.gelu

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)  # upcycle.py replaces this with moe.PESCMoE / moe.SparseUpcycledMoE

    def forward(self, x, token_mask=None):
        """Returns (x, aux_loss); aux_loss is None for a dense FFN."""
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)  # the router and the FFN both read the FFN input
        if isinstance(self.mlp, MLP):
            return x + self.mlp(h), None
        y, aux_loss = self.mlp(h, token_mask)  # an MoE layer: padding tokens are kept out of its aux loss
        return x + y, aux_loss


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.upcycle_args = None  # set by upcycle.upcycle(); saved in checkpoints to rebuild the MoE
        self.aux_loss = None      # the last forward's summed MoE aux loss (detached), for logging
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            if getattr(module, "ZERO_INIT", False):  # an adapter's W_up: zero keeps upcycling exact
                torch.nn.init.zeros_(module.weight)
            else:
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, token_mask=None):
        """idx, targets: (B, T) int64, targets == -1 is ignored (prompt and padding positions).
        token_mask: (B, T) bool, False on padding; only real tokens count in the MoE aux losses.
        Returns (logits, loss). With targets: logits for every position and loss = cross-entropy
        plus the sum of the MoE layers' aux losses. Without: logits of the last position only."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        aux_losses = []
        for block in self.transformer.h:
            x, aux = block(x, token_mask)
            if aux is not None:
                aux_losses.append(aux)
        x = self.transformer.ln_f(x)
        aux_total = torch.stack(aux_losses).sum() if aux_losses else None
        self.aux_loss = aux_total.detach() if aux_total is not None else None
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, vocab)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        if aux_total is not None:
            loss = loss + aux_total
        return logits, loss

    def moe_layers(self):
        """The MoE layers in depth order (empty for a dense model)."""
        return [block.mlp for block in self.transformer.h if not isinstance(block.mlp, MLP)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, n_vocab=None):
        """Autoregressive sampling as nanoGPT (no KV cache); temperature 0 means greedy. Rows that
        produced eos_id keep emitting it; generation stops once every row has. n_vocab: the
        tokenizer's size; the padding ids above it (vocab_size is rounded up) are never sampled."""
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()
            if n_vocab is not None:
                logits[:, n_vocab:] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            if eos_id is not None:
                idx_next = torch.where(finished[:, None], torch.full_like(idx_next, eos_id), idx_next)
                finished |= idx_next[:, 0] == eos_id
            idx = torch.cat((idx, idx_next), dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None, dropout=0.0):
        """GPT-2 weights in Hugging Face layout, without transformers: a model name (downloaded
        once into cache_dir), a local directory (config.json optional), or a weights file."""
        state, hf_config = load_hf_gpt2_state(name_or_path, cache_dir)
        config = gpt2_config(name_or_path, hf_config, state, dropout)
        model = cls(config)
        model.load_state_dict(convert_hf_gpt2_state(state, model, source=str(name_or_path)))
        return model


# -----------------------------------------------------------------------------
# GPT-2 checkpoint loading (Hugging Face layout)

GPT2_SIZES = {  # n_layer, n_head, n_embd: the four released GPT-2 models
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_cache_dir():
    return os.environ.get("PESC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pesc"))


def read_weights_file(path):
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path} is a .safetensors file; reading it needs the optional package "
                              f"safetensors (pip install safetensors), or use pytorch_model.bin") from None
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read GPT-2 weights from {path}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def download(url, dest):
    """HTTPS download with a tqdm bar; written to a temporary file and renamed, so an interrupted
    download never leaves a truncated file behind under the real name."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".part"
    with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
        total = int(response.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(tmp, dest)


def find_or_fetch_gpt2(name, cache_dir):
    """Path of a cached weights file for a named GPT-2, downloading it when missing."""
    folder = os.path.join(cache_dir or default_cache_dir(), name)
    for fname in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, fname)):
            return os.path.join(folder, fname)
    fname = "model.safetensors" if has_safetensors() else "pytorch_model.bin"
    dest = os.path.join(folder, fname)
    url = f"https://huggingface.co/{name}/resolve/main/{fname}"
    try:
        download(url, dest)
    except OSError as e:  # URLError, timeouts, DNS failure: we are offline
        raise FileNotFoundError(
            f"{name} weights are not cached and could not be downloaded from {url} ({e}). "
            f"On a machine with internet, download pytorch_model.bin (or model.safetensors) from "
            f"https://huggingface.co/{name} and put it in {folder}/ , or pass its path instead of "
            f"the name.") from None
    return dest


def load_hf_gpt2_state(name_or_path, cache_dir=None):
    """Returns (state_dict, config.json dict or None)."""
    weights, config_path = gpt2_weights_file(name_or_path, cache_dir)
    hf_config = None
    if config_path and os.path.isfile(config_path):
        with open(config_path) as f:
            hf_config = json.load(f)
    return read_weights_file(weights), hf_config


def gpt2_weights_file(name_or_path, cache_dir=None):
    """(weights file, config.json path or None) for a model name, a directory or a file."""
    path = str(name_or_path)
    if os.path.isdir(path):
        readable = WEIGHT_FILES if has_safetensors() else WEIGHT_FILES[1:]
        present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        usable = [f for f in readable if f in present]
        if not present:
            raise FileNotFoundError(f"{path} holds none of {', '.join(WEIGHT_FILES)}")
        weights = os.path.join(path, (usable or present)[0])  # a lone .safetensors explains itself below
        config_path = os.path.join(path, "config.json")
    elif os.path.isfile(path):
        weights, config_path = path, os.path.join(os.path.dirname(path), "config.json")
    elif path in GPT2_SIZES:
        weights, config_path = find_or_fetch_gpt2(path, cache_dir), None
    else:
        raise FileNotFoundError(f"{path!r} is neither a file, a directory, nor one of {', '.join(GPT2_SIZES)}")
    return weights, config_path


def has_safetensors():
    try:
        import safetensors  # noqa: F401
        return True
    except ImportError:
        return False


def gpt2_config(name_or_path, hf_config, state, dropout):
    """GPTConfig for a GPT-2 checkpoint: from the model name, config.json, or the tensor shapes."""
    state = strip_prefix(state)
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(f"{name_or_path}: not a GPT-2 checkpoint (no wte.weight / wpe.weight key)")
    vocab_size, n_embd = state["wte.weight"].shape
    block_size = state["wpe.weight"].shape[0]
    n_layer = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("h.")), default=-1)
    name = str(name_or_path)
    if name in GPT2_SIZES:
        n_head = GPT2_SIZES[name][1]
    elif hf_config is not None and "n_head" in hf_config:
        n_head = hf_config["n_head"]
    else:  # every released GPT-2 uses 64-dimensional heads
        n_head = n_embd // 64
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, dropout=dropout, bias=True, gelu="tanh")


def strip_prefix(state):
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model saves "h.0..."
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def convert_hf_gpt2_state(state, model, source="checkpoint"):
    """Maps a Hugging Face GPT-2 state dict onto model.state_dict() keys, transposing the Conv1D
    weights; missing keys or wrong shapes are a ValueError that names them."""
    state = strip_prefix(state)
    ours = model.state_dict()
    out, problems = {}, []
    for key, target in ours.items():
        if key == "lm_head.weight":
            continue  # tied to wte; filled below
        hf_key = key.removeprefix("transformer.")
        if hf_key not in state:
            problems.append(f"missing key {hf_key}")
            continue
        tensor, expected = state[hf_key], tuple(target.shape)
        if hf_key.endswith(CONV1D_WEIGHTS):
            expected = expected[::-1]  # checked and reported in the file's (in, out) layout
        if tuple(tensor.shape) != expected:
            problems.append(f"{hf_key}: expected shape {expected}, got {tuple(tensor.shape)}")
            continue
        if hf_key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        out[key] = tensor.to(target.dtype).contiguous()
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ValueError(f"{source} does not match the GPT-2 architecture: {shown}")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
