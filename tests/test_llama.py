"""
Tests for the Llama family (model_type "llama": Llama-3.x, SmolLM2; "qwen2": Qwen2, Qwen2.5) from
the Hugging Face files to a tuned PESC checkpoint, with tiny random checkpoints written here.

- Loading: tiny checkpoints with the real Hugging Face key names and config.json, written as
  model.safetensors (by the small writer below, bf16 tensors included), pytorch_model.bin and a
  sharded index + 2 shards, are loaded with GPT.from_pretrained and their logits compared with a
  reference forward written here from the architecture's equations (RMSNorm, rotate-half RoPE with
  the "llama3" frequency scaling, grouped-query attention, q/k/v biases, SwiGLU, tied or untied
  head) in float64 with plain torch ops on the tensors that went into the files. Nothing of
  model.py's math is used by the reference.
- bf16 loading; clear errors for what cannot be loaded.
- Upcycling a loaded Llama model (PESC, sparse): the function is kept, the trainable set is right,
  training lowers the loss; a delta checkpoint over a sharded base is rebuilt exactly and refuses a
  changed or missing base.
- train.py and sample.py end to end on a tiny Llama folder with its own tokenizer, from a folder
  and from a hub repo id served by an HTTP server on 127.0.0.1.

CPU only, no network, a few seconds.

    python -m pytest -q tests/test_llama.py
"""

import hashlib
import json
import math
import os
import shutil
import struct
import sys

import pytest
import torch

import checkpoint
import sample
import train
from evaluate import read_log
from helpers import FakeHub, isolate_from_network, spread_routers
from model import GPT
from tokenizer import load_tokenizer
from upcycle import upcycle

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="the safetensors writer below assumes a "
                                                                     "little-endian host")

D, N_HEAD, FFN, N_LAYER, VOCAB = 32, 4, 48, 2, 64   # head size 8: four RoPE frequencies
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


# -----------------------------------------------------------------------------
# writing Hugging Face checkpoints

def hf_config(model_type="llama", **overrides):
    """A config.json as transformers writes it for a LlamaForCausalLM / Qwen2ForCausalLM."""
    config = dict(architectures=["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
                  model_type=model_type, hidden_size=D, intermediate_size=FFN, num_hidden_layers=N_LAYER,
                  num_attention_heads=N_HEAD, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                  hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                  tie_word_embeddings=False, torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not ...}   # `...` drops a key (its default applies)


def hf_state(config, seed=0):
    """Random weights under the Hugging Face names. Matrices have std 1/sqrt(fan_in) and the norms'
    gains are 1 + N(0, 0.1^2): activations and logits of order one, so 1e-4 is a real bound."""
    g = torch.Generator().manual_seed(seed)
    d, nh = config["hidden_size"], config["num_attention_heads"]
    nkv, hs, ffn = config.get("num_key_value_heads") or nh, d // nh, config["intermediate_size"]   # null: nh

    def matrix(n_out, n_in, std=None):
        return torch.randn(n_out, n_in, generator=g) * (std or 1 / math.sqrt(n_in))

    def gain(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    state = {"model.embed_tokens.weight": matrix(config["vocab_size"], d, std=2 / math.sqrt(d))}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = gain(d)
        for name, n_out in (("q", nh * hs), ("k", nkv * hs), ("v", nkv * hs)):
            state[p + f"self_attn.{name}_proj.weight"] = matrix(n_out, d)
            if config["model_type"] == "qwen2":
                state[p + f"self_attn.{name}_proj.bias"] = 0.3 * torch.randn(n_out, generator=g)
        state[p + "self_attn.o_proj.weight"] = matrix(d, nh * hs)
        state[p + "post_attention_layernorm.weight"] = gain(d)
        state[p + "mlp.gate_proj.weight"] = matrix(ffn, d)
        state[p + "mlp.up_proj.weight"] = matrix(ffn, d)
        state[p + "mlp.down_proj.weight"] = matrix(d, ffn)
    state["model.norm.weight"] = gain(d)
    if not config.get("tie_word_embeddings", False):
        state["lm_head.weight"] = matrix(config["vocab_size"], d, std=2 / math.sqrt(d))
    return state


SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def safetensors_bytes(tensors):
    """A .safetensors file: the header's length (unsigned 64-bit little-endian), the header (JSON:
    name -> dtype, shape, [begin, end) in the data section; padded with spaces to 8 bytes), then
    every tensor's raw little-endian bytes, row-major, one after another."""
    header, chunks, at = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [at, at + len(raw)]}
        chunks.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_checkpoint(folder, config, state, fmt="safetensors"):
    """Writes config.json and the weights: "safetensors" (one file), "bin" (torch.save, as
    pytorch_model.bin) or "sharded" (model.safetensors.index.json + two shards)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if fmt == "safetensors":
        write_bytes(os.path.join(folder, "model.safetensors"), safetensors_bytes(state))
    elif fmt == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    elif fmt == "sharded":
        names = list(state)
        halves = (names[:len(names) // 2], names[len(names) // 2:])
        for shard, keys in zip(SHARDS, halves):
            write_bytes(os.path.join(folder, shard), safetensors_bytes({k: state[k] for k in keys}))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: shard for shard, keys in zip(SHARDS, halves) for k in keys}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    else:
        raise AssertionError(fmt)
    return str(folder)


def tiny_folder(folder, model_type="llama", fmt="safetensors", seed=0, bf16=False, **overrides):
    """config, state (the tensors exactly as stored) and the folder they were written to."""
    config = hf_config(model_type, **overrides)
    state = hf_state(config, seed)
    if bf16:  # matrices in bf16, gains in fp32: a file may mix dtypes
        state = {k: v.to(torch.bfloat16) if v.dim() == 2 else v for k, v in state.items()}
    return config, state, write_checkpoint(folder, config, state, fmt)


# -----------------------------------------------------------------------------
# the reference forward: the Hugging Face Llama / Qwen2 equations in float64

def reference_inv_freq(head_dim, theta, scaling=None):
    """RoPE's per-pair angular speeds theta^(-2i/head_dim); with "llama3" scaling, each by its
    wavelength 2 pi / f: shorter than old_len / high_freq_factor kept, longer than
    old_len / low_freq_factor divided by factor, in between the blend (1 - s) f / factor + s f
    with s = (old_len / wavelength - low) / (high - low)."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
            factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old_len = scaling["original_max_position_embeddings"]
            wavelength = 2 * math.pi / f
            if wavelength > old_len / low:
                f = f / factor
            elif wavelength >= old_len / high:
                s = (old_len / wavelength - low) / (high - low)
                f = (1 - s) * f / factor + s * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def reference_logits(config, state, idx):
    """Logits (B, T, vocab) of a LlamaForCausalLM / Qwen2ForCausalLM, from config.json's values and
    the file's tensors, in float64."""
    W = {k: v.double() for k, v in state.items()}
    d, nh = config["hidden_size"], config["num_attention_heads"]
    nkv, hs = config.get("num_key_value_heads") or nh, d // nh
    eps = config.get("rms_norm_eps", 1e-6)
    B, T = idx.shape

    def rms_norm(x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps))

    inv_freq = reference_inv_freq(hs, config.get("rope_theta", 10000.0), config.get("rope_scaling"))
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]    # (T, hs/2)
    cos, sin = angle.cos(), angle.sin()

    def rotate(x):
        """Rotate-half: channel j and channel j + hs/2 form the pair turned by angle j."""
        a, b = x[..., :hs // 2], x[..., hs // 2:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = W["model.embed_tokens.weight"][idx]                                  # (B, T, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"])

        def project(name, n_heads):
            y = h @ W[p + f"self_attn.{name}_proj.weight"].t()
            if p + f"self_attn.{name}_proj.bias" in W:
                y = y + W[p + f"self_attn.{name}_proj.bias"]
            return y.view(B, T, n_heads, hs).transpose(1, 2)                # (B, heads, T, hs)

        q, k, v = rotate(project("q", nh)), rotate(project("k", nkv)), project("v", nkv)
        heads = []
        for j in range(nh):   # query head j reads key/value head j // (nh / nkv)
            kv = j // (nh // nkv)
            scores = q[:, j] @ k[:, kv].transpose(-1, -2) / math.sqrt(hs)   # (B, T, T)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])          # (B, T, hs)
        x = x + torch.cat(heads, dim=-1) @ W[p + "self_attn.o_proj.weight"].t()
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"])
        gate, up = h @ W[p + "mlp.gate_proj.weight"].t(), h @ W[p + "mlp.up_proj.weight"].t()
        x = x + (gate * torch.sigmoid(gate) * up) @ W[p + "mlp.down_proj.weight"].t()
    x = rms_norm(x, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if config.get("tie_word_embeddings", False) else W["lm_head.weight"]
    return x @ head.t()


def all_logits(model, idx):
    """Logits at every position (a forward with targets returns them all)."""
    with torch.no_grad():
        logits, _, _ = model(idx, torch.zeros_like(idx))
    return logits


def token_ids(seed, B=2, T=12, vocab=VOCAB):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# loading: logits against the reference

CASES = {
    # Llama-3 style: GQA, theta 500, llama3 scaling, tied head, matrices stored in bf16, one file
    "llama-gqa-llama3-tied-bf16-safetensors": dict(
        model_type="llama", fmt="safetensors", bf16=True,
        overrides=dict(num_key_value_heads=2, rope_theta=500.0, rope_scaling=LLAMA3_SCALING,
                       max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    # Qwen2 style: q/k/v biases, one key/value head, theta 1e6, untied head, pytorch_model.bin
    "qwen2-biases-mqa-untied-bin": dict(
        model_type="qwen2", fmt="bin", bf16=False,
        overrides=dict(num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=False, rms_norm_eps=1e-6)),
    # plain multi-head Llama, sharded; rope_theta and tie_word_embeddings left to their defaults
    # (10000, untied), and a large rms_norm_eps so that ignoring it would show
    "llama-mha-sharded-defaults": dict(
        model_type="llama", fmt="sharded", bf16=False,
        overrides=dict(num_key_value_heads=4, rope_theta=..., tie_word_embeddings=..., rms_norm_eps=1e-2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_reference(tmp_path, case):
    spec = CASES[case]
    config, state, folder = tiny_folder(tmp_path / case, spec["model_type"], spec["fmt"], bf16=spec["bf16"],
                                        **spec["overrides"])
    if spec["bf16"]:   # the file really holds bf16 tensors (its header, read here by hand)
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        assert header["model.layers.0.mlp.up_proj.weight"]["dtype"] == "BF16"
        assert header["model.norm.weight"]["dtype"] == "F32"
    idx = token_ids(1)
    expected = reference_logits(config, state, idx)
    assert expected.std() > 0.5
    model = GPT.from_pretrained(folder).eval()
    got = all_logits(model, idx)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got.double() - expected).abs().max().item() < 1e-4
    c = model.config
    assert (c.n_kv_head, c.qkv_bias, c.tie_embeddings) == (config.get("num_key_value_heads"),
                                                           spec["model_type"] == "qwen2",
                                                           config.get("tie_word_embeddings", False))
    if c.tie_embeddings:
        assert model.lm_head.weight is model.transformer.wte.weight


def test_null_config_values_mean_the_defaults(tmp_path):
    """transformers reads "num_key_value_heads": null as n_head and "head_dim": null as
    hidden_size / num_attention_heads; so does the loader."""
    config, state, folder = tiny_folder(tmp_path / "m", num_key_value_heads=None, head_dim=None, rope_theta=500.0)
    model = GPT.from_pretrained(folder).eval()
    assert (model.config.n_kv_head, model.config.head_dim) == (N_HEAD, D // N_HEAD)
    idx = token_ids(7)
    assert (all_logits(model, idx).double() - reference_logits(config, state, idx)).abs().max().item() < 1e-4


def test_the_reference_is_sensitive_to_each_setting():
    """The cases above would catch a loader that ignored a setting: each changes the logits."""
    config = hf_config("llama", rope_theta=500.0, rope_scaling=LLAMA3_SCALING, rms_norm_eps=1e-2)
    state = hf_state(config)
    idx = token_ids(1)
    base = reference_logits(config, state, idx)
    for change in (dict(rope_scaling=None), dict(rope_theta=10000.0), dict(rms_norm_eps=1e-6)):
        assert (reference_logits(dict(config, **change), state, idx) - base).abs().max() > 1e-2, change


def test_llama3_scaling_changes_the_frequencies_at_this_head_size(tmp_path):
    hs = D // N_HEAD
    plain, scaled = reference_inv_freq(hs, 500.0), reference_inv_freq(hs, 500.0, LLAMA3_SCALING)
    ratio = (plain / scaled).tolist()
    factor = LLAMA3_SCALING["factor"]
    # all three regimes occur: kept (fast), blended, divided by factor (slow)
    assert ratio[0] == 1.0
    assert any(1.0 < r < factor - 1e-6 for r in ratio)
    assert any(abs(r - factor) < 1e-9 for r in ratio)
    # and the model uses the scaled frequencies (compared in fp32, which model.py stores)
    # the older spelling {"type": "llama3"} is the same scaling
    legacy = {("type" if k == "rope_type" else k): v for k, v in LLAMA3_SCALING.items()}
    for i, scaling in enumerate((LLAMA3_SCALING, legacy)):
        _, _, folder = tiny_folder(tmp_path / str(i), rope_theta=500.0, rope_scaling=scaling)
        model = GPT.from_pretrained(folder)
        assert torch.allclose(model.rope_inv_freq.double(), scaled, rtol=1e-6, atol=0)


def test_bf16_loading(tmp_path):
    config, state, folder = tiny_folder(tmp_path / "m", "llama", "safetensors", **CASES[
        "llama-gqa-llama3-tied-bf16-safetensors"]["overrides"])
    idx = token_ids(2)
    fp32 = all_logits(GPT.from_pretrained(folder).eval(), idx)
    model = GPT.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.transformer.wte.weight
    got = all_logits(model, idx)
    assert got.dtype == torch.bfloat16
    err = ((got.double() - fp32.double()).norm() / fp32.double().norm()).item()
    assert 0 < err < 0.05, err
    assert (got.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.8


# -----------------------------------------------------------------------------
# errors

def load_error(tmp_path, config_change=None, state_change=None, model_type="llama"):
    config = hf_config(model_type)
    state = hf_state(config)
    config.update(config_change or {})
    if state_change:
        state_change(state)
    folder = write_checkpoint(tmp_path / "bad", config, state)
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(folder)
    return str(e.value)


def test_missing_key_is_named(tmp_path):
    msg = load_error(tmp_path, state_change=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    assert "missing" in msg and "model.layers.1.mlp.up_proj.weight" in msg


def test_missing_untied_head_is_named(tmp_path):
    msg = load_error(tmp_path, state_change=lambda s: s.pop("lm_head.weight"))
    assert "missing" in msg and "lm_head.weight" in msg


def test_wrong_shape_names_key_expected_and_got(tmp_path):
    def widen(state):  # k_proj of all 4 heads where config.json says 2 key/value heads
        state["model.layers.0.self_attn.k_proj.weight"] = torch.randn(D, D)
    msg = load_error(tmp_path, state_change=widen)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "(16, 32)" in msg and "(32, 32)" in msg
    assert msg.index("(16, 32)") < msg.index("(32, 32)")   # expected, then got


def test_missing_qwen2_bias_is_named(tmp_path):
    msg = load_error(tmp_path, model_type="qwen2",
                     state_change=lambda s: s.pop("model.layers.0.self_attn.v_proj.bias"))
    assert "model.layers.0.self_attn.v_proj.bias" in msg


@pytest.mark.parametrize("change, words", [
    (dict(model_type="mistral"), ["mistral"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}), ["yarn"]),
    (dict(hidden_act="gelu"), ["gelu", "hidden_act"]),
    (dict(head_dim=16), ["head_dim", "16"]),
    (dict(attention_bias=True), ["attention_bias"]),
])
def test_unsupported_config_is_named(tmp_path, change, words):
    msg = load_error(tmp_path, config_change=change)
    assert all(w in msg for w in words), msg
    assert "not supported" in msg


# -----------------------------------------------------------------------------
# upcycling a loaded Llama model

def expert_counts(model, idx):
    with torch.no_grad():
        _, _, routing = model(idx)
    return routing.counts


LORA_TARGETS = {f"attn.{p}_proj" for p in "qkvo"} | {f"mlp.ffn.{p}_proj" for p in ("gate", "up", "down")}


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["pesc", "sparse"])
def test_upcycling_a_loaded_llama_keeps_its_function_and_trains(tmp_path, method, model_type):
    _, _, folder = tiny_folder(tmp_path / "base", model_type, "safetensors", num_key_value_heads=2, rope_theta=500.0,
                               rope_scaling=LLAMA3_SCALING if model_type == "llama" else None,
                               tie_word_embeddings=model_type == "llama")
    idx = token_ids(3, B=4, T=16)
    targets = token_ids(4, B=4, T=16)
    dense = all_logits(GPT.from_pretrained(folder).eval(), idx)
    model = GPT.from_pretrained(folder)
    lora = dict(lora_rank=2, lora_targets="all") if method == "pesc" else dict(lora_rank=0)
    upcycle(model, method, n_experts=4, top_k=2, adapter_dim=8, verbose=False, **lora)
    model.eval()
    spread_routers(model, idx)
    counts = expert_counts(model, idx)
    assert counts.shape == (N_LAYER, 4) and (counts > 0).all(), counts   # every expert gets tokens
    assert (all_logits(model, idx) - dense).abs().max().item() < 1e-5

    names = trainable_names(model)
    for name in names:
        layer, rest = name.removeprefix("transformer.h.").split(".", 1)
        assert layer.isdigit(), name
        if method == "pesc":
            assert rest in ("mlp.router.gate.weight", "mlp.w_down", "mlp.w_up") or (
                rest.rsplit(".", 1)[0] in LORA_TARGETS and rest.endswith((".lora_A", ".lora_B"))), name
        else:
            assert rest == "mlp.router.gate.weight" or (
                rest.startswith("mlp.experts.") and rest.endswith(("gate_proj.weight", "up_proj.weight",
                                                                   "down_proj.weight"))), name
    if method == "pesc":   # every target in every layer has LoRA, every layer its router and adapters
        lora_at = {(n.split(".")[2], n.split(".", 3)[3].rsplit(".", 1)[0]) for n in names if "lora_" in n}
        assert lora_at == {(str(i), t) for i in range(N_LAYER) for t in LORA_TARGETS}
        assert sum("lora_" in n for n in names) == 2 * N_LAYER * len(LORA_TARGETS)
        assert sum(n.endswith((".w_down", ".w_up", ".router.gate.weight")) for n in names) == 3 * N_LAYER
    else:
        assert len(names) == N_LAYER * (1 + 4 * 3)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        _, ce, routing = model(idx, targets)
        (ce + routing.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(ce.item())
    assert losses[-1] < losses[0] - 0.05, losses


# -----------------------------------------------------------------------------
# a delta checkpoint over a sharded Hugging Face base

def test_delta_checkpoint_over_a_sharded_base(tmp_path):
    _, _, folder = tiny_folder(tmp_path / "base", "llama", "sharded", num_key_value_heads=2, rope_theta=500.0,
                               rope_scaling=LLAMA3_SCALING, max_position_embeddings=256)
    ref = checkpoint.base_reference(folder, "hf")
    h = hashlib.sha256()
    for name in ("model.safetensors.index.json",) + SHARDS:
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    assert ref["sha256"] == h.hexdigest()
    assert ref["format"] == "hf" and ref["path"] == os.path.abspath(folder)

    idx, targets = token_ids(5, B=4, T=16), token_ids(6, B=4, T=16)
    model = GPT.from_pretrained(folder)
    torch.manual_seed(0)
    upcycle(model, "pesc", n_experts=4, top_k=2, adapter_dim=8, lora_rank=2, lora_targets="all", verbose=False)
    spread_routers(model, idx)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _, ce, routing = model(idx, targets)
        (ce + routing.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    assert all(moe.w_up.abs().max() > 0 for moe in model.moe_layers())   # tuned, not the identity
    expected = all_logits(model, idx)

    ckpt = checkpoint.make_checkpoint(model, ref, dict(note="test"))
    assert ckpt["kind"] == "delta" and ckpt["base"] == ref
    assert "transformer.wte.weight" not in ckpt["model"] and "lm_head.weight" not in ckpt["model"]
    path = str(tmp_path / "out" / "ckpt.pt")
    checkpoint.save_checkpoint(path, ckpt)
    assert os.path.getsize(path) < sum(os.path.getsize(os.path.join(folder, s)) for s in SHARDS)

    rebuilt = checkpoint.build_model(checkpoint.read_checkpoint(path), path).eval()
    assert torch.equal(all_logits(rebuilt, idx), expected)

    shard = os.path.join(folder, SHARDS[1])
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "r+b") as f:   # in place (no truncation under the loaded models' memory maps)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([data[-1] ^ 0x01]))   # one bit of the last tensor's data
    with pytest.raises(ValueError, match="sha256"):
        checkpoint.build_model(checkpoint.read_checkpoint(path), path)
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError):
        checkpoint.build_model(checkpoint.read_checkpoint(path), path)


# -----------------------------------------------------------------------------
# train.py and sample.py end to end

def gpt2_byte_symbols():
    """GPT-2's byte-to-character table in its vocabulary order (ids 0..255): the visible Latin-1
    bytes as themselves, then the others in increasing order as U+0100, U+0101, ..."""
    visible = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    hidden = [b for b in range(256) if b not in visible]
    return dict([(b, chr(b)) for b in visible] + [(b, chr(0x100 + n)) for n, b in enumerate(hidden)])


N_MERGES = 9


def tiny_tokenizer_files():
    """A byte-level BPE tokenizer.json (256 byte tokens, a few merges, then <|begin_of_text|> and
    <|endoftext|>) and its tokenizer_config.json, which asks for a BOS as Llama-3's does.
    Returns them and the number of ids."""
    symbols = gpt2_byte_symbols()
    space, newline = symbols[0x20], symbols[0x0A]
    merges = [("#", "#"), ("##", "#"), ("e", "s"), (space, "t"), ("h", "e"), (space + "t", "he"), ("o", "n"),
              ("i", "n"), (":", newline)]
    vocab = {c: i for i, c in enumerate(symbols.values())}
    assert len(merges) == N_MERGES
    for a, b in merges:
        vocab[a + b] = len(vocab)
    bos, eot = "<|begin_of_text|>", "<|endoftext|>"
    added = {bos: len(vocab), eot: len(vocab) + 1}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in added.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict(vocab, **added), "merges": [f"{a} {b}" for a, b in merges]},
    }
    config = {"bos_token": bos, "eos_token": eot, "add_bos_token": True, "model_max_length": 128}
    return tokenizer, config, len(vocab) + len(added)


def train_folder(folder):
    """A tiny Llama model folder with its tokenizer, as a hub repo holds it."""
    tokenizer, tokenizer_config, n_vocab = tiny_tokenizer_files()
    tiny_folder(folder, "llama", "safetensors", vocab_size=64 * math.ceil(n_vocab / 64), max_position_embeddings=128,
                rope_theta=500.0, tie_word_embeddings=True)
    for name, content in (("tokenizer.json", tokenizer), ("tokenizer_config.json", tokenizer_config)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False)
    return str(folder)


TRAIN_ARGS = ["--max_iters=4", "--eval_interval=2", "--n_train=60", "--n_val=6", "--batch_size=4",
              "--eval_max_new_tokens=3", "--n_samples=1", "--n_experts=4", "--top_k=2", "--adapter_dim=8",
              "--lora_rank=2", "--device=cpu", "--dtype=float32", "--block_size=128"]


def check_run(out, base_folder):
    rows = read_log(out)
    assert [(r["stage"], r["step"]) for r in rows] == [("before", 0), ("tune", 2), ("tune", 4)]
    assert all(math.isfinite(r["val_loss"]) for r in rows)
    assert "exact_match" in rows[-1]
    ckpt = checkpoint.read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["kind"] == "delta" and ckpt["base"]["format"] == "hf"
    assert ckpt["base"]["path"] == os.path.abspath(base_folder)
    assert ckpt["model_args"]["family"] == "llama"
    assert ckpt["tokenizer"] == {"kind": "hf", "folder": os.path.abspath(base_folder)}
    tok = load_tokenizer(ckpt["tokenizer"])
    assert (tok.bos_id, tok.eos_id, tok.n_vocab) == (256 + N_MERGES, 257 + N_MERGES, 258 + N_MERGES)
    assert len(tok.encode("### Instruction:")) < len("### Instruction:")   # the merges are used
    outputs = sample.main([f"--ckpt={out}/ckpt.pt", "--prompt=hi", "--max_new_tokens=3", "--temperature=0",
                           "--device=cpu"])
    assert len(outputs) == 1 and isinstance(outputs[0], str)


def test_train_and_sample_from_a_llama_folder(tmp_path):
    folder = train_folder(tmp_path / "tiny-llama")
    out = str(tmp_path / "out")
    result = train.main([f"--init_from={folder}", f"--out_dir={out}"] + TRAIN_ARGS)
    assert result["method"] == "pesc" and result["counts"]["trainable"] < result["counts"]["total"]
    check_run(out, folder)


def test_train_and_sample_from_a_hub_repo_id(tmp_path, monkeypatch):
    isolate_from_network(monkeypatch, tmp_path / "cache")
    monkeypatch.chdir(tmp_path)   # "tiny-org/tiny-llama" must not exist as a relative path
    hub = FakeHub(str(tmp_path / "hub"))
    try:
        folder, served = train_folder(tmp_path / "served"), set()
        for name in os.listdir(folder):
            served.add(f"/tiny-org/tiny-llama/resolve/main/{name}")
            with open(os.path.join(folder, name), "rb") as f:
                hub.add(f"/tiny-org/tiny-llama/resolve/main/{name}", f.read())
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        out = str(tmp_path / "out")
        train.main(["--init_from=tiny-org/tiny-llama", f"--out_dir={out}", "--load_dtype=bfloat16"] + TRAIN_ARGS)
        fetched = {p.rsplit("/", 1)[1] for p in hub.paths() if p in served}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= fetched
        assert all(p.startswith("/tiny-org/tiny-llama/resolve/main/") for p in hub.paths())
        check_run(out, str(tmp_path / "cache" / "tiny-org" / "tiny-llama"))
        ckpt = checkpoint.read_checkpoint(f"{out}/ckpt.pt")
        assert ckpt["base"]["dtype"] == "bfloat16"   # the base is rebuilt as it was tuned: in bf16
        rebuilt = checkpoint.build_model(ckpt, f"{out}/ckpt.pt")
        assert {p.dtype for p in rebuilt.parameters()} == {torch.bfloat16}
    finally:
        hub.close()
