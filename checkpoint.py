"""
Checkpoints: written atomically, read with clear errors, rebuilt into models.

  kind "full"   every tensor of the model (a pretrained base, or a full fine-tune): self-contained.
  kind "delta"  only the trainable tensors (adapters, routers, LoRA factors; the FFN copies of sparse
                upcycling) plus a reference to the base they were tuned on: its path, its sha256 and its
                format ("train.py" for a full checkpoint of this project, "hf" for Hugging Face weights,
                where a sharded base is hashed index first, then every shard). Rebuilding one = load the
                base, check its hash, upcycle it again with the saved upcycle_args (a 4-bit base is
                quantized again: NF4 quantization is deterministic), load the tensors.

A checkpoint holds plain data only, so torch.load(weights_only=True) reads it: model_args,
upcycle_args, the tensors, and what train.py adds (step, optimizer state, config, RNG states, the
tokenizer's spec). A crash during a save leaves the previous file intact (temporary file + os.replace).
"""

import hashlib
import os

import torch

from model import GPT, GPTConfig
from upcycle import upcycle

LAYOUT = 2   # 2: stacked expert weights, kinds "full"/"delta", the Llama family. Older files are refused.
KINDS = ("full", "delta")


def files_sha256(paths):
    """One sha256 over the bytes of several files in order (a sharded base: the index, then the shards)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path, ckpt):
    """Write to a temporary file in the same folder, then os.replace: a crash mid-save leaves the
    previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no model_args/kind)")
    if ckpt.get("layout") != LAYOUT:
        raise ValueError(f"{path} was written by an earlier version of this project (checkpoint layout "
                         f"{ckpt.get('layout', 1)}, this one reads {LAYOUT}: experts are now stored stacked). "
                         f"Retrain it (python train.py ...), or read it with the commit that wrote it.")
    if ckpt["kind"] not in KINDS:
        raise ValueError(f"{path} has an unknown kind {ckpt['kind']!r} (expected one of {KINDS})")
    return ckpt


def weight_files(path):
    """The files a base's hash covers: the file itself, or a Hugging Face folder's weight files."""
    if os.path.isdir(path):
        from tensorfile import find_weight_files
        return find_weight_files(path)
    return [path]


def base_reference(path, fmt, dtype=None):
    """How a delta checkpoint names its base: the file or folder, the sha256 of its weights, and its
    format ("train.py" or "hf"); dtype: the dtype a Hugging Face base was loaded in (None = fp32)."""
    return dict(path=os.path.abspath(path), sha256=files_sha256(weight_files(path)), format=fmt,
                dtype=None if dtype is None else str(dtype).removeprefix("torch."))


def trainable_state(model):
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}


def make_checkpoint(model, base_ref, extra):
    """kind "full": every tensor. kind "delta": only the trainable tensors + the base reference.
    `extra`: plain data the caller wants kept (train.py: step, optimizer, config, ...)."""
    args = dict(layout=LAYOUT, model_args=vars(model.config).copy(), upcycle_args=model.upcycle_args, **extra)
    if model.upcycle_args is None:   # rebuilt in the dtype it was saved in (a bf16 model stays bf16)
        dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
        return dict(kind="full", model=model.state_dict(), dtype=dtype, **args)
    trainable = {k: v.detach() for k, v in trainable_state(model).items()}
    return dict(kind="delta", model=trainable, base=base_ref, **args)


def build_model(ckpt, path, dropout=None):
    """Rebuilds the model a checkpoint describes (on the CPU). dropout: overrides the saved value
    (a base pretrained without dropout may be tuned with it)."""
    model_args = dict(ckpt["model_args"])
    if dropout is not None:
        model_args["dropout"] = dropout
    if ckpt["kind"] == "full":
        try:
            model = GPT(GPTConfig(**model_args))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: model_args do not describe a GPT ({e})") from None
        load_state(model, ckpt["model"], path)
        return model.to(getattr(torch, ckpt.get("dtype", "float32")))
    model = load_base(ckpt["base"], path, model_args["dropout"])
    if architecture(vars(model.config)) != architecture(ckpt["model_args"]):
        raise ValueError(f"{path}: its base {ckpt['base']['path']} has another architecture")
    upcycle(model, **ckpt["upcycle_args"], verbose=False)
    trainable = trainable_state(model)
    missing = [k for k in trainable if k not in ckpt["model"]]
    unexpected = [k for k in ckpt["model"] if k not in trainable]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the architecture it names: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    load_state(model, ckpt["model"], path, strict=False)   # strict=False: the frozen base is not in the file
    return model


def load_base(base, path, dropout):
    """The base a delta checkpoint names, after checking it is still the same file(s)."""
    if not os.path.exists(base["path"]):
        raise FileNotFoundError(f"{path} holds only the tuned tensors: it needs its base {base['path']}, "
                                f"which is missing; put the base back there (sha256 {base['sha256'][:12]}...)")
    if files_sha256(weight_files(base["path"])) != base["sha256"]:
        raise ValueError(f"{path} was tuned on a base with sha256 {base['sha256'][:12]}..., but "
                         f"{base['path']} is a different file now; restore that base or retune")
    if base["format"] == "hf":
        dtype = getattr(torch, base["dtype"]) if base.get("dtype") else None
        return GPT.from_pretrained(base["path"], dtype=dtype, dropout=dropout)
    return build_model(read_checkpoint(base["path"]), base["path"], dropout=dropout)


def rng_state():
    """The random generators' states of this process, saved (one per rank) in every training checkpoint
    so that a resume continues with the same dropout masks and router jitter: the CPU generator and
    every CUDA device's."""
    state = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def architecture(model_args):
    return {k: v for k, v in model_args.items() if k != "dropout"}


def load_state(model, state, path, strict=True):
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"{path} holds weights of another architecture: {str(e)[:300]}") from None
