"""
Tests for GPT.from_pretrained on GPT-2: small random checkpoints in the Hugging Face GPT-2 layout are
written to a temporary directory (pytorch_model.bin, or model.safetensors written byte by byte here
and by the safetensors package where installed), loaded, and checked against a reference forward
pass written here from the raw tensors with plain torch ops (no code shared with model.py). Also the
loader's errors and the named-model cache. CPU only, no network (a closed port on 127.0.0.1), seconds.

    python -m pytest tests/test_gpt2_loader.py -q
"""

import json
import math
import os
import struct

import pytest
import torch

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
        logits, _, _ = model(idx, idx)  # with targets: the logits of every position
    reference = reference_logits(state, idx, n_head)
    assert reference.std().item() > 0.5  # logits of order one: 1e-5 is a real bound
    assert (logits.double() - reference).abs().max().item() <= 1e-5
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    return reference


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


def write_safetensors(path, state):
    """The safetensors layout by hand: 8-byte little-endian header length, a JSON header of dtypes,
    shapes and byte offsets, then the raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, tensor in state.items():
        data = tensor.contiguous().numpy().astype("<f4").tobytes()
        header[name] = dict(dtype="F32", shape=list(tensor.shape), data_offsets=[offset, offset + len(data)])
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_written_by_hand(tmp_path):
    state = {k: v for k, v in hf_gpt2_state(**SIZES, seed=5).items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    write_config(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", state)
    check_against_reference(GPT.from_pretrained(tmp_path), state, 4, 50, 12)


def test_safetensors_written_by_the_package(tmp_path):
    safetensors_torch = pytest.importorskip(
        "safetensors.torch", reason="safetensors is not installed (optional): the cross-check is skipped")
    state = {k: v.contiguous() for k, v in hf_gpt2_state(**SIZES, seed=5).items()}
    write_config(tmp_path)
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    check_against_reference(GPT.from_pretrained(tmp_path), state, 4, 50, 12)


def test_safetensors_preferred_over_bin_in_a_folder(tmp_path):
    good = {k: v for k, v in hf_gpt2_state(**SIZES, seed=7).items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    write_checkpoint(tmp_path, hf_gpt2_state(**SIZES, seed=8))          # a different .bin next to it
    write_safetensors(tmp_path / "model.safetensors", good)
    check_against_reference(GPT.from_pretrained(tmp_path), good, 4, 50, 12)


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
    with pytest.raises(FileNotFoundError, match="neither a file, a folder"):
        GPT.from_pretrained(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path)  # an existing directory without weights


def test_unreadable_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


def test_named_model_offline_says_where_to_put_the_files(tmp_path, monkeypatch, dead_endpoint):
    monkeypatch.setenv("PESC_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    with pytest.raises(FileNotFoundError) as info:
        GPT.from_pretrained("gpt2")
    message = str(info.value)
    folder = os.path.join(str(tmp_path), "gpt2")
    assert folder in message and "config.json" in message, message
    assert not any(f for _, _, files in os.walk(tmp_path) for f in files if not f.endswith(".part"))


def test_named_model_from_cache(tmp_path, monkeypatch, dead_endpoint):
    """A cached "gpt2" (config.json and weights in $PESC_CACHE/gpt2) loads without any network;
    its n_head (12) comes from the model name."""
    monkeypatch.setenv("PESC_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    sizes = dict(n_layer=1, n_head=12, n_embd=24, n_positions=6, vocab_size=30)
    state = hf_gpt2_state(**sizes, seed=6)
    write_checkpoint(tmp_path / "gpt2", state, sizes)
    with open(tmp_path / "gpt2" / "config.json", "w") as f:   # a config without n_head
        json.dump(dict(model_type="gpt2", n_layer=1, n_embd=24), f)
    model = GPT.from_pretrained("gpt2")
    assert model.config.n_head == 12
    check_against_reference(model, state, 12, 30, 6)


def test_bf16_loading_halves_the_weights(tmp_path):
    state = hf_gpt2_state(**SIZES, seed=9)
    write_checkpoint(tmp_path, state)
    model = GPT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits, _, _ = model(torch.arange(12)[None] % 50)
    reference = reference_logits(state, torch.arange(12)[None] % 50, 4)[:, -1:]
    assert (logits.double() - reference).abs().max().item() < 0.2 * reference.abs().max().item()
