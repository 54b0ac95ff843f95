"""
Hugging Face checkpoints into model.GPT, without transformers: GPT-2 and the Llama family
(model_type "llama": Llama-3.x, SmolLM2; "qwen2": Qwen2, Qwen2.5).

    model = GPT.from_pretrained("HuggingFaceTB/SmolLM2-135M")   # model.py's entry point calls load_pretrained
    source = resolve("Qwen/Qwen2.5-0.5B")                       # the local folder (downloaded once)
    tok = tokenizer_for(source)                                 # its own tokenizer (tokenizer.py)

Where the files come from (resolve): a local folder, a GPT-2 weights file, or a hub repo id, fetched
once by hub.fetch_model into ~/.cache/pesc/<repo id>/ ($PESC_CACHE moves it). config.json becomes a
GPTConfig; the weights (model.safetensors, a sharded index + shards, or pytorch_model.bin) are read by
tensorfile.py, memory-mapped, and renamed to model.py's keys:

  Hugging Face (Llama family)                    model.py
  model.embed_tokens.weight                      transformer.wte.weight
  model.layers.N.input_layernorm.weight          transformer.h.N.ln_1.weight
  model.layers.N.self_attn.{q,k,v,o}_proj.*      transformer.h.N.attn.{q,k,v,o}_proj.*   (Qwen2: q/k/v biases)
  model.layers.N.post_attention_layernorm.weight transformer.h.N.ln_2.weight
  model.layers.N.mlp.{gate,up,down}_proj.weight  transformer.h.N.mlp.{gate,up,down}_proj.weight
  model.norm.weight                              transformer.ln_f.weight
  lm_head.weight (absent when tied)              lm_head.weight

GPT-2 keeps its own names ("h.N.attn.c_attn.weight", ...) with its Conv1D weights stored (in, out),
hence the transposes. Missing keys, wrong shapes, unsupported model types, activations or rope
scalings are a ValueError that names them.
"""

import os

import torch

from model import GPT, GPTConfig, rope_inverse_frequencies
from tensorfile import read_json

GPT2_SIZES = {  # n_layer, n_head, n_embd: the four released GPT-2 models (hub repos "gpt2", "gpt2-medium", ...)
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LLAMA_TYPES = ("llama", "qwen2")
IGNORED_KEYS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")   # buffers some files carry


def resolve(name_or_path, cache_dir=None):
    """A local folder or weights file as is; a hub repo id ("gpt2", "org/name") -> its cached folder,
    downloaded once (hub.fetch_model: a progress bar, atomic, resumable; offline, a message that says
    which files to put where)."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.exists(path):
        return os.path.abspath(path)
    if path in GPT2_SIZES or (path.count("/") == 1 and not path.startswith((".", "/"))):
        from hub import fetch_model
        return fetch_model(path, cache_dir=cache_dir)
    raise FileNotFoundError(f"{name_or_path!r} is neither a file, a folder, nor a Hugging Face repo id such as "
                            f"gpt2 or HuggingFaceTB/SmolLM2-135M")


def read_hf_config(source):
    """config.json next to the weights (a folder's, or a weights file's folder), or None."""
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    return read_json(path)


def read_state(source, dtype):
    from tensorfile import read_folder, read_weights
    return read_folder(source, dtype=dtype) if os.path.isdir(source) else read_weights(source, dtype=dtype)


def load_pretrained(name_or_path, dtype=None, dropout=0.0, cache_dir=None):
    """GPT.from_pretrained: resolve, read config and weights, map the keys, build the model. The
    model is built on the meta device and takes the file's tensors as they are (no random init of
    weights that are overwritten next: seconds saved for a 1B model)."""
    source = resolve(name_or_path, cache_dir)
    hf_config = read_hf_config(source)
    state = read_state(source, dtype or torch.float32)   # fp32 unless asked (bf16 halves the memory)
    llama = hf_config is not None and hf_config.get("model_type", "gpt2") != "gpt2"
    if llama:
        config = llama_config(hf_config, source, dropout)
    else:
        config = gpt2_config(str(name_or_path), hf_config, state, dropout)
    with torch.device("meta"):
        model = GPT(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}   # what the file must provide
    state = convert_llama_state(state, config, shapes, source) if llama else convert_gpt2_state(state, shapes, source)
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:  # assign=True replaced both parameters: tie them again
        model.transformer.wte.weight = model.lm_head.weight
    if config.family == "llama":  # a buffer that is not in the file: compute it for real
        model.rope_inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return model


def take(state, mapping, shapes, source, family, transposed=()):
    """Our state dict from the file's: mapping {our key: file key}. Every problem is collected and
    reported at once."""
    out, problems = {}, []
    for key, file_key in mapping.items():
        if file_key not in state:
            problems.append(f"missing key {file_key}")
            continue
        tensor, expected = state[file_key], shapes[key]
        if file_key.endswith(transposed):
            expected = expected[::-1]  # checked and reported in the file's (in, out) layout
        if tuple(tensor.shape) != expected:
            problems.append(f"{file_key}: expected shape {expected}, got {tuple(tensor.shape)}")
            continue
        out[key] = tensor.t().contiguous() if file_key.endswith(transposed) else tensor
    wanted = set(mapping.values())
    unused = [k for k in state if k not in wanted and not k.endswith(IGNORED_KEYS)]
    if unused:
        problems.append(f"unexpected keys {unused[:5]}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ValueError(f"{source} does not match the {family} architecture: {shown}")
    return out


# -----------------------------------------------------------------------------
# GPT-2

def gpt2_config(name, hf_config, state, dropout):
    """GPTConfig for a GPT-2 checkpoint: from the model name, config.json, or the tensor shapes."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(f"{name}: not a GPT-2 checkpoint (no wte.weight / wpe.weight key) and no config.json "
                         f"with a model_type")
    vocab_size, n_embd = state["wte.weight"].shape
    block_size = state["wpe.weight"].shape[0]
    n_layer = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("h.")), default=-1)
    if os.path.basename(name.rstrip("/")) in GPT2_SIZES:
        n_head = GPT2_SIZES[os.path.basename(name.rstrip("/"))][1]
    elif hf_config is not None and "n_head" in hf_config:
        n_head = hf_config["n_head"]
    else:  # every released GPT-2 uses 64-dimensional heads
        n_head = max(1, n_embd // 64)
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     dropout=dropout, bias=True, gelu="tanh", norm_eps=(hf_config or {}).get("layer_norm_epsilon", 1e-5))


def convert_gpt2_state(state, shapes, source):
    """GPT2Model saves "h.0...", GPT2LMHeadModel "transformer.h.0..." plus a tied lm_head.
    shapes: model.py's state-dict keys and shapes."""
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    mapping = {key: key.removeprefix("transformer.") for key in shapes if key != "lm_head.weight"}
    out = take(state, mapping, shapes, source, "GPT-2", transposed=CONV1D_WEIGHTS)
    out["lm_head.weight"] = out["transformer.wte.weight"]   # tied, as GPT-2
    return out


# -----------------------------------------------------------------------------
# the Llama family

def llama_config(hf, source, dropout):
    """GPTConfig from a Llama / Qwen2 config.json; what the model cannot represent is an error."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: gpt2, llama "
                         f"(Llama-3.x, SmolLM2) and qwen2 (Qwen2, Qwen2.5)")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):   # the same function under two names
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (the SwiGLU FFN uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{source}: attention_bias / mlp_bias are not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
    n_head, n_embd = hf["num_attention_heads"], hf["hidden_size"]
    # null means "the default" for these two, as in transformers' LlamaConfig: n_head, n_embd // n_head
    n_kv_head = hf.get("num_key_value_heads") or n_head
    if (hf.get("head_dim") or n_embd // n_head) != n_embd // n_head:
        raise ValueError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"{source}: rope scaling {kind!r} is not supported (supported: none, llama3)")
    return GPTConfig(family="llama", block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                     n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=n_kv_head,
                     n_embd=n_embd, ffn_dim=hf["intermediate_size"], bias=False, qkv_bias=model_type == "qwen2",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(hf.get("rope_theta", 10000.0)),
                     rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False), dropout=dropout)


def llama_key(key):
    """model.py's key -> the Hugging Face Llama / Qwen2 key (the table at the top of this file)."""
    if key == "lm_head.weight":
        return key
    key = key.replace("transformer.wte.", "model.embed_tokens.").replace("transformer.ln_f.", "model.norm.")
    key = key.replace("transformer.h.", "model.layers.").replace(".attn.", ".self_attn.")
    return key.replace(".ln_1.", ".input_layernorm.").replace(".ln_2.", ".post_attention_layernorm.")


def convert_llama_state(state, config, shapes, source):
    mapping = {key: llama_key(key) for key in shapes}
    if config.tie_embeddings:
        mapping["lm_head.weight"] = "model.embed_tokens.weight"   # the file has no lm_head, or a copy
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return take(state, mapping, shapes, source, config_family_name(config))


def config_family_name(config):
    return "Qwen2" if config.qkv_bias else "Llama"


def tokenizer_for(source):
    """The tokenizer a checkpoint was trained with: from its folder's tokenizer.json or vocab.json +
    merges.txt (tokenizer.py); a GPT-2 weights file with no tokenizer files next to it uses
    tiktoken's GPT-2 encoding."""
    from tokenizer import gpt2_tokenizer, hf_tokenizer
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
        return hf_tokenizer(folder)
    config = read_hf_config(source)
    if config is None or config.get("model_type", "gpt2") == "gpt2":
        return gpt2_tokenizer()
    raise FileNotFoundError(f"{folder} has no tokenizer.json (or vocab.json + merges.txt): put the model's "
                            f"tokenizer files there")
