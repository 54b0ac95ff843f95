"""
Tests for GPT.from_pretrained: small random checkpoints in the Hugging Face GPT-2 layout are written
to a temporary directory, loaded, and checked against a reference forward pass written here from
the raw tensors with plain torch ops (no code shared with model.py). Also the loader's errors.
CPU only, no network, a few seconds.

    python -m pytest tests/test_gpt2_loader.py -q
"""

import json
import math
import os
import socket
import urllib.error
import urllib.request

import pytest
import torch

import model as model_module
from model import GPT

SIZES = dict(n_layer=2, n_head=4, n_embd=32, n_positions=12, vocab_size=50)


def hf_gpt2_state(n_layer, n_head, n_embd, n_positions, vocab_size, seed=0):
    """A random GPT-2 state dict as GPT2Model saves it: Conv1D weights stored (in, out), the causal
    mask buffer `attn.bias` and the old `attn.masked_bias` scalar included. Matrices have std
    ~1/sqrt(d), so activations and logits are of order one at any width."""
    g = torch.Generator().manual_seed(seed)
    d = n_embd
    w = 1.0 / math.sqrt(d)

    def rand(*shape, std=w, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    state = {"wte.weight": rand(vocab_size, d, std=2 * w), "wpe.weight": rand(n_positions, d, std=2 * w),
             "ln_f.weight": rand(d, mean=1.0, std=0.1), "ln_f.bias": rand(d, std=0.1)}
    for i in range(n_layer):
        p = f"h.{i}."
        state.update({
            p + "ln_1.weight": rand(d, mean=1.0, std=0.1), p + "ln_1.bias": rand(d, std=0.1),
            p + "attn.bias": torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions),
            p + "attn.masked_bias": torch.tensor(-1e4),
            p + "attn.c_attn.weight": rand(d, 3 * d), p + "attn.c_attn.bias": rand(3 * d, std=0.1),
            p + "attn.c_proj.weight": rand(d, d), p + "attn.c_proj.bias": rand(d, std=0.1),
            p + "ln_2.weight": rand(d, mean=1.0, std=0.1), p + "ln_2.bias": rand(d, std=0.1),
            p + "mlp.c_fc.weight": rand(d, 4 * d), p + "mlp.c_fc.bias": rand(4 * d, std=0.1),
            p + "mlp.c_proj.weight": rand(4 * d, d, std=w / 2), p + "mlp.c_proj.bias": rand(d, std=0.1),
        })
    return state


def write_config(folder, sizes=SIZES):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(sizes, model_type="gpt2"), f)


def write_checkpoint(folder, state, sizes=SIZES, fname="pytorch_model.bin", config=True):
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, fname))
    if config:
        write_config(folder, sizes)
    return os.path.join(folder, fname)


# -----------------------------------------------------------------------------
# the reference: GPT-2's forward from the raw Hugging Face tensors, in float64

def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance, as nn.LayerNorm
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(state, idx, n_head):
    s = {k.removeprefix("transformer."): v.double() for k, v in state.items()}
    B, t = idx.shape
    C = s["wte.weight"].shape[1]
    hs = C // n_head
    x = s["wte.weight"][idx] + s["wpe.weight"][:t]                      # (B, t, C)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(1 + max(int(k.split(".")[1]) for k in s if k.startswith("h."))):
        p = f"h.{i}."
        a = layer_norm(x, s[p + "ln_1.weight"], s[p + "ln_1.bias"])
        qkv = a @ s[p + "attn.c_attn.weight"] + s[p + "attn.c_attn.bias"]  # Conv1D: x @ W + b
        q, k, v = (z.reshape(B, t, n_head, hs).transpose(1, 2) for z in qkv.split(C, dim=-1))
        att = q @ k.transpose(-2, -1) / math.sqrt(hs)                   # (B, nh, t, t)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, t, C)
        x = x + y @ s[p + "attn.c_proj.weight"] + s[p + "attn.c_proj.bias"]
        m = layer_norm(x, s[p + "ln_2.weight"], s[p + "ln_2.bias"])
        m = gelu_tanh(m @ s[p + "mlp.c_fc.weight"] + s[p + "mlp.c_fc.bias"])
        x = x + m @ s[p + "mlp.c_proj.weight"] + s[p + "mlp.c_proj.bias"]
    x = layer_norm(x, s["ln_f.weight"], s["ln_f.bias"])
    return x @ s["wte.weight"].t()                                      # tied LM head


def check_against_reference(model, state, n_head, vocab_size, block_size):
    model.eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(vocab_size, (2, block_size), generator=g)
    with torch.no_grad():
        logits, _ = model(idx, idx)  # with targets: the logits of every position
    reference = reference_logits(state, idx, n_head)
    assert reference.std().item() > 0.5  # logits of order one: 1e-5 is a real bound
    assert (logits.double() - reference).abs().max().item() <= 1e-5
    return reference
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading


# -----------------------------------------------------------------------------
# loading

@pytest.mark.parametrize("layout", ["GPT2Model", "GPT2LMHeadModel"])
def test_directory_matches_reference(tmp_path, layout):
    state = hf_gpt2_state(**SIZES)
    if layout == "GPT2LMHeadModel":  # keys under "transformer.", plus the (tied) lm_head
        state = {"transformer." + k: v for k, v in state.items()}
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    write_checkpoint(tmp_path, state)
    model = GPT.from_pretrained(tmp_path)
    c = model.config
    # n_head = 4 (head size 8) can only come from config.json: without it the loader assumes 64
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 4, 32, 12, 50)
    assert c.gelu == "tanh" and c.bias
    check_against_reference(model, state, 4, 50, 12)


def test_single_weights_file(tmp_path):
    # no config.json: n_head comes from GPT-2's 64-dimensional heads, so n_embd = 128 -> 2 heads
    sizes = dict(n_layer=1, n_head=2, n_embd=128, n_positions=8, vocab_size=40)
    state = hf_gpt2_state(**sizes, seed=3)
    path = write_checkpoint(tmp_path / "weights", state, sizes, fname="gpt2-tiny.bin", config=False)
    model = GPT.from_pretrained(path)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (1, 2, 128)
    check_against_reference(model, state, 2, 40, 8)


def test_single_weights_file_reads_config_next_to_it(tmp_path):
    state = hf_gpt2_state(**SIZES, seed=4)
    path = write_checkpoint(tmp_path, state)
    model = GPT.from_pretrained(str(path))
    assert model.config.n_head == 4
    check_against_reference(model, state, 4, 50, 12)


def test_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip(
        "safetensors.torch", reason="safetensors is not installed (optional): model.safetensors not tested")
    state = hf_gpt2_state(**SIZES, seed=5)
    state = {k: v.contiguous() for k, v in state.items()}
    write_config(tmp_path)
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    model = GPT.from_pretrained(tmp_path)
    check_against_reference(model, state, 4, 50, 12)


def test_safetensors_without_the_package_explains(tmp_path):
    if model_module.has_safetensors():
        pytest.skip("safetensors is installed: the missing-package message cannot be shown")
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ImportError, match="pip install safetensors"):
        GPT.from_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# errors

def test_missing_key_is_named(tmp_path):
    state = hf_gpt2_state(**SIZES)
    del state["h.1.mlp.c_fc.bias"]
    write_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match=r"missing key h\.1\.mlp\.c_fc\.bias"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,bad_shape,expected_shape", [
    ("h.0.mlp.c_fc.weight", (32, 100), (32, 128)),   # Conv1D: both shapes in the file's (in, out) layout
    ("h.1.attn.c_attn.weight", (32, 96, 1), (32, 96)),  # wrong rank, too: still a ValueError
    ("ln_f.bias", (31,), (32,)),
])
def test_wrong_shape_is_named(tmp_path, key, bad_shape, expected_shape):
    state = hf_gpt2_state(**SIZES)
    state[key] = torch.zeros(bad_shape)
    write_checkpoint(tmp_path, state)
    with pytest.raises(ValueError) as info:
        GPT.from_pretrained(tmp_path)
    message = str(info.value)
    assert key in message and str(expected_shape) in message and str(bad_shape) in message, message


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file, a directory"):
        GPT.from_pretrained(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="holds none of"):
        GPT.from_pretrained(tmp_path)  # an existing directory without weights


def test_unreadable_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not read GPT-2 weights"):
        GPT.from_pretrained(tmp_path)


def offline(*args, **kwargs):
    """What urllib raises on a machine without a network (DNS failure)."""
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def test_named_model_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    # PESC_CACHE keeps the real cache untouched; urlopen is made to fail as it does offline, so this
    # never downloads GPT-2's 500 MB even where a network happens to be reachable.
    monkeypatch.setenv("PESC_CACHE", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as info:
        GPT.from_pretrained("gpt2")
    message = str(info.value)
    folder = os.path.join(str(tmp_path), "gpt2")
    assert "not cached" in message and folder in message and "pytorch_model.bin" in message, message
    assert "https://huggingface.co/gpt2" in message
    assert not any(files for _, _, files in os.walk(tmp_path))  # no partial download left behind


def test_named_model_from_cache(tmp_path, monkeypatch):
    # a cached "gpt2" is used without the network; its n_head (12) comes from the model name
    monkeypatch.setenv("PESC_CACHE", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    sizes = dict(n_layer=1, n_head=12, n_embd=24, n_positions=6, vocab_size=30)
    state = hf_gpt2_state(**sizes, seed=6)
    write_checkpoint(tmp_path / "gpt2", state, sizes, config=False)
    model = GPT.from_pretrained("gpt2")
    assert model.config.n_head == 12
    check_against_reference(model, state, 12, 30, 6)
