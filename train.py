"""
The whole PESC recipe in one file: get a dense base, upcycle it, instruction-tune it, evaluate, sample.

    python train.py                                  # the offline demo: ~minutes on 2 CPU cores
    python train.py config/compare_dense.py          # a config file, then flags on top
    python train.py --method=sparse --max_iters=300  # any global below can be overridden

Stages (each prints a progress bar):
1. base: init_from="base" (default) loads base_ckpt, or pretrains a small dense GPT on the Python
   documentation that ships inside CPython (pydoc_data) with a byte-level tokenizer when it is not
   there yet; "scratch" always pretrains; "gpt2", "gpt2-medium", ... load GPT-2 weights; a path loads
   a dense checkpoint written by this script; "resume" continues out_dir/ckpt.pt.
2. upcycle: method="pesc" (upcycle.py), "sparse" (sparse upcycling), "adapter" (the dense baseline:
   PESC with one expert and top-1, i.e. one adapter per FFN) or "dense" (full fine-tune, no experts).
3. tune on the embedded instruction set (data/instruct.py) or a file (dataset=...), loss on the
   response tokens only, AdamW with warmup + cosine decay.
4. evaluate before and after: held-out response loss and greedy exact match per task family,
   per-layer expert load; one JSON line per eval in out_dir/log.jsonl.
5. print a few greedy samples of held-out prompts.
"""

import ast
import functools
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.instruct import (FAMILIES, collate, decode_response, encode_dataset, format_prompt, load_instruction_file,
                           make_instruction_set)
from data.pydocs import BYTE_VOCAB_SIZE, encode_corpus, get_tokenizer, load_pydocs_documents, train_val_split
from model import GPT, GPT2_SIZES, GPTConfig, gpt2_weights_file
from upcycle import count_params, upcycle

# -----------------------------------------------------------------------------
# default config: the offline CPU demo. Every global here can be set by a config/*.py file or --key=value.
# I/O
out_dir = "out"                 # tuned checkpoint (ckpt.pt) and log.jsonl go here
base_ckpt = "out/base.pt"       # the cached pretrained base (init_from="base")
init_from = "base"              # "base" | "scratch" | "resume" | "gpt2" | "gpt2-medium" | ... | path to a dense ckpt
eval_interval = 200             # held-out response loss every this many tuning steps
log_interval = 10
eval_max_new_tokens = 16        # greedy decoding budget for exact match
n_samples = 6                   # greedy samples printed at the end
seed = 1337
# base model (used when pretraining from scratch)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
bias = True
dropout = 0.0
# pretraining of the base (only when it is not cached)
pretrain_iters = 600
pretrain_batch_size = 32
pretrain_lr = 3e-3
# upcycling
method = "pesc"                 # "pesc" | "sparse" | "adapter" | "dense"
n_experts = 8
top_k = 2
adapter_dim = 32
adapter_scale = 1.0
adapter_dropout = 0.0
layers = "all"                  # "all" | "every_other"
lora_rank = 8                   # LoRA on the attention projections; 0 = attention stays frozen
lora_alpha = 16.0
aux_loss_coef = 0.01            # alpha in Eq. 10
z_loss_coef = 0.0
router_jitter = 0.0
dispatch = "dense"              # "dense" (masked matmuls / CUDA kernels) | "loop" (Mixtral style)
# instruction tuning
dataset = "embedded"            # "embedded" or a path to Alpaca .json / Alpaca-or-chat .jsonl
n_train = 6000                  # size of the embedded instruction set
data_seed = 1337                # the embedded set's generator seed: fixed, so runs of any seed share the data
n_val = 300
max_iters = 1000
lr_decay_iters = 0              # length of the warmup + cosine schedule; 0 = max_iters
batch_size = 32                 # per micro-step and per process
gradient_accumulation_steps = 1
learning_rate = 5e-3
min_lr_ratio = 0.1              # cosine decays to learning_rate * min_lr_ratio
warmup_frac = 0.03              # the paper's 3 % warmup
weight_decay = 0.0              # the paper uses none; only matrices would get it, never norms/biases/routers
grad_clip = 1.0
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
compile = False                 # torch.compile the model (the uncompiled module is what gets saved)
backend = "nccl" if torch.cuda.is_available() else "gloo"  # DDP backend under torchrun
peak_flops = 989e12             # for MFU: H100/H200 dense bf16
# -----------------------------------------------------------------------------

def settings(scope):
    """A script's settings: its lowercase module globals of plain types (train.py's above, sample.py's)."""
    return {k: v for k, v in scope.items()
            if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))}


DEFAULTS = settings(globals())   # the config above, before anything else is defined
METHODS = ("pesc", "sparse", "adapter", "dense")


def parse_config(argv, defaults):
    """nanoGPT's configurator, strict: config files and --key=value flags may only set keys that
    exist in `defaults`, with a value of the same type (an int is accepted for a float).
    Returns the updated dict; raises ValueError saying what is wrong and listing the valid keys."""
    config = dict(defaults)

    def assign(key, value, source):
        if key not in defaults:
            raise ValueError(f"unknown config key {key!r} in {source}; valid keys: {', '.join(sorted(defaults))}")
        want = type(defaults[key])
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ValueError(f"{key} from {source} must be {want.__name__}, got {value!r} "
                             f"({type(value).__name__}); default is {defaults[key]!r}")
        config[key] = value

    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found (flags look like --key=value)")
            scope = {}
            with open(arg) as f:
                source = f.read()
            try:
                exec(source, {}, scope)  # a config file is plain Python assignments, as in nanoGPT
            except Exception as e:
                raise ValueError(f"config file {arg} does not run: {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                if not key.startswith("_"):
                    assign(key, value, arg)
            continue
        if "=" not in arg:
            raise ValueError(f"flag {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        if key in defaults and isinstance(defaults[key], str):
            value = text  # strings need no quotes: --init_from=gpt2
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"cannot read the value of {arg!r} (expected a Python literal)") from None
        assign(key, value, arg)
    return config


# -----------------------------------------------------------------------------
# checkpoints: written atomically; a tuned PESC/sparse/adapter checkpoint holds only the trainable
# tensors and points at its base by path and sha256; dense checkpoints are self-contained.

def file_sha256(path):
    h = hashlib.sha256()
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
    return ckpt


def trainable_state(model):
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}


def base_reference(path, fmt):
    """How a delta checkpoint names its base: the file, its sha256, and whether it is a checkpoint of
    this script ("train.py") or Hugging Face GPT-2 weights ("hf")."""
    return dict(path=os.path.abspath(path), sha256=file_sha256(path), format=fmt)


def make_checkpoint(model, base_ref, extra):
    """kind "dense": the full state dict. kind "delta": only the trainable tensors + the base reference."""
    args = dict(model_args=vars(model.config).copy(), upcycle_args=model.upcycle_args, **extra)
    if model.upcycle_args is None:
        return dict(kind="dense", model=model.state_dict(), **args)
    trainable = {k: v.detach() for k, v in trainable_state(model).items()}
    return dict(kind="delta", model=trainable, base=base_ref, **args)


def build_model(ckpt, path):
    """Rebuilds the model a checkpoint describes: dense directly; delta = its base + upcycle + tensors."""
    try:
        config = GPTConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: model_args do not describe a GPT ({e})") from None
    if ckpt["kind"] == "dense":
        model = GPT(config)
        load_state(model, ckpt["model"], path)
        return model
    base = ckpt["base"]
    if not os.path.isfile(base["path"]):
        raise FileNotFoundError(f"{path} holds only the tuned tensors: it needs its base {base['path']}, "
                                f"which is missing; put the base back there (sha256 {base['sha256'][:12]}...)")
    if file_sha256(base["path"]) != base["sha256"]:
        raise ValueError(f"{path} was tuned on a base with sha256 {base['sha256'][:12]}..., but "
                         f"{base['path']} is a different file now; restore that base or retune")
    if base["format"] == "hf":
        model = GPT.from_pretrained(base["path"])
    else:
        model = build_model(read_checkpoint(base["path"]), base["path"])
    if architecture(vars(model.config)) != architecture(ckpt["model_args"]):
        raise ValueError(f"{path}: its base {base['path']} has another architecture")
    upcycle(model, **ckpt["upcycle_args"], verbose=False)
    missing = [k for k in trainable_state(model) if k not in ckpt["model"]]
    if missing:
        raise ValueError(f"{path} does not match the architecture it names: missing {missing[:3]}")
    load_state(model, ckpt["model"], path, strict=False)
    return model


def architecture(model_args):
    return {k: v for k, v in model_args.items() if k != "dropout"}


def load_state(model, state, path, strict=True):
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"{path} holds weights of another architecture: {str(e)[:300]}") from None


# -----------------------------------------------------------------------------
# data

def pretrain_batch(data, step, batch_size, block_size, seed):
    """Random crops of the corpus; the crops depend only on (seed, step), so a rerun sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    return x, y


def tune_batch(encoded, step, batch_size, seed, pad_id):
    """Epoch-wise shuffling: batch `step` is a pure function of (seed, step), so resuming is exact."""
    n = len(encoded)
    start = step * batch_size
    rows = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        rows.append(encoded[perm[i]])
    return collate(rows, pad_id)


@functools.lru_cache(maxsize=1)  # one epoch's order at a time; callers only read it
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()


def lr_at(step, total, peak, warmup_frac, min_ratio):
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, weight_decay, device_type):
    """Weight decay on matrices only; never on norms, biases or routers."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and ".router." not in name else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel over all tensors instead of a loop over them (PESC has many small ones); CPU too since torch 2.4
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device_type in ("cuda", "cpu"))


# -----------------------------------------------------------------------------
# evaluation

def add_routing_counts(total, model):
    """total + the (n_moe_layers, E) expert counts of the model's last forward; None for a dense model."""
    layers = model.moe_layers()
    if not layers:
        return total
    counts = torch.stack([layer.last_counts.float() for layer in layers])
    return counts if total is None else total + counts


@torch.no_grad()
def response_loss(model, encoded, batch_size, pad_id, device, ctx):
    """Mean cross-entropy per response token over a split, and the summed expert counts."""
    model.eval()
    total, count = 0.0, 0
    expert_counts = None
    for i in range(0, len(encoded), batch_size):
        idx, targets, mask = (t.to(device) for t in collate(encoded[i:i + batch_size], pad_id))
        with ctx:
            logits, _ = model(idx, targets, mask)
        n = int((targets != -1).sum())
        ce = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                                               ignore_index=-1, reduction="sum")
        total, count = total + float(ce), count + n
        expert_counts = add_routing_counts(expert_counts, model)
    model.train()
    return total / max(count, 1), expert_counts


@torch.no_grad()
def greedy_answers(model, enc, examples, max_new_tokens, device, ctx, desc="generate"):
    """Greedy responses for a list of examples. Prompts of equal token length are decoded together,
    so no padding is ever fed to the model (GPT-2 has no padding mask)."""
    model.eval()
    eot = enc.eot_token
    prompts = [enc.encode_ordinary(format_prompt(ex["instruction"], ex.get("input", ""))) for ex in examples]
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    answers = [None] * len(examples)
    for length, rows in tqdm(sorted(by_length.items()), desc=desc, leave=False):
        for s in range(0, len(rows), 64):
            chunk = rows[s:s + 64]
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            with ctx:
                out = model.generate(idx, max_new_tokens, temperature=0, eos_id=eot, n_vocab=enc.n_vocab)
            for row, i in zip(out[:, length:].tolist(), chunk):
                answers[i] = decode_response(enc, row)
    model.train()
    return answers


def exact_match(model, enc, examples, max_new_tokens, device, ctx, desc="exact match"):
    """Greedy exact-match accuracy per task family (answers compared after stripping whitespace)."""
    answers = greedy_answers(model, enc, examples, max_new_tokens, device, ctx, desc)
    hits = {}
    for ex, ans in zip(examples, answers):
        hits.setdefault(ex["family"], []).append(ans.strip() == ex["output"].strip())
    acc = {fam: sum(v) / len(v) for fam, v in hits.items()}
    acc["average"] = sum(acc.values()) / len(acc)
    return acc


def load_summary(expert_counts):
    """Per-layer (min share, max share) of expert assignments; perfect balance is 1/E each."""
    if expert_counts is None:
        return None
    shares = expert_counts / expert_counts.sum(dim=1, keepdim=True).clamp(min=1)
    return [(round(float(s.min()), 4), round(float(s.max()), 4)) for s in shares]


# -----------------------------------------------------------------------------
# stage 1: the dense base

def pretrain_base(cfg, enc, device, ctx):
    """Pretrains a small dense GPT on CPython's own documentation and saves it to base_ckpt."""
    ids = encode_corpus(enc, load_pydocs_documents())
    train_ids, val_ids = train_val_split(ids)
    config = GPTConfig(block_size=cfg["block_size"], vocab_size=BYTE_VOCAB_SIZE, n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"], bias=cfg["bias"])
    torch.manual_seed(cfg["seed"])
    model = GPT(config).to(device)
    print(f"pretraining a dense base on the Python docs ({len(ids):,} byte tokens): "
          f"{count_params(model)['total']:,} parameters, {cfg['pretrain_iters']} steps")
    opt = make_optimizer(model, cfg["pretrain_lr"], 0.1, device.split(":")[0])
    total = cfg["pretrain_iters"]
    bar = tqdm(range(total), desc="pretrain base")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg["pretrain_lr"], 0.05, 0.1)
        x, y = (t.to(device) for t in pretrain_batch(train_ids, step, cfg["pretrain_batch_size"],
                                                     config.block_size, cfg["seed"]))
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad(), ctx:
        vals = [model(*(t.to(device) for t in pretrain_batch(val_ids, i, 32, config.block_size, cfg["seed"] + 1)))[1]
                for i in range(4)]
    val = float(torch.stack(vals).mean())
    print(f"base: held-out docs loss {val:.3f} nats/byte")
    save_checkpoint(cfg["base_ckpt"], make_checkpoint(model.cpu(), None, dict(tokenizer="bytes", val_loss=val)))
    print(f"saved the base to {cfg['base_ckpt']}")


def load_tokenizer(name):
    """get_tokenizer for the scripts: a tokenizer that cannot be fetched (GPT-2's BPE files, offline)
    is a user error with a message saying what to do, not a traceback."""
    try:
        return get_tokenizer(name)
    except RuntimeError as e:
        raise ValueError(str(e)) from None


def is_hf_gpt2(init):
    return init in GPT2_SIZES or os.path.isdir(init) or init.endswith((".bin", ".safetensors"))


def load_base(cfg, device, ctx, master):
    """Returns (dense model on cpu, tokenizer name, base reference for the delta checkpoints)."""
    init = cfg["init_from"]
    if init == "scratch" or (init == "base" and not os.path.exists(cfg["base_ckpt"])):
        if master:
            pretrain_base(cfg, get_tokenizer("bytes"), device, ctx)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's base
        return load_base(dict(cfg, init_from="base"), device, ctx, master)
    if is_hf_gpt2(init):
        weights, _ = gpt2_weights_file(init)  # downloads a named model once, with a progress bar
        model = GPT.from_pretrained(init, dropout=cfg["dropout"])
        return model, "gpt2", base_reference(weights, "hf")
    path = cfg["base_ckpt"] if init == "base" else init
    ckpt = read_checkpoint(path)
    if ckpt["kind"] != "dense":
        raise ValueError(f"{path} is a tuned PESC/adapter checkpoint; init_from needs a dense one "
                         f"(use --init_from=resume to continue tuning)")
    if init == "base":
        wanted = dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], block_size=cfg["block_size"])
        have = {k: ckpt["model_args"][k] for k in wanted}
        if have != wanted:
            raise ValueError(f"the cached base {path} has {have}, but the config asks for {wanted}; use "
                             f"--init_from=scratch to pretrain a new base, or set base_ckpt to another path")
    if master:
        print(f"loaded the dense base from {path}")
    return build_model(ckpt, path), ckpt.get("tokenizer", "bytes"), base_reference(path, "train.py")


def apply_method(model, cfg, verbose=True):
    """Turns the dense base into what cfg["method"] tunes, in place: all of it (dense), or PESC / sparse
    upcycling / the one-adapter baseline (PESC with one expert, top-1) with only the new parts trainable."""
    if cfg["method"] == "dense":
        return model.requires_grad_(True)
    single = cfg["method"] == "adapter"
    return upcycle(model, method="sparse" if cfg["method"] == "sparse" else "pesc",
                   n_experts=1 if single else cfg["n_experts"], top_k=1 if single else cfg["top_k"],
                   adapter_dim=cfg["adapter_dim"], adapter_scale=cfg["adapter_scale"],
                   adapter_dropout=cfg["adapter_dropout"], layers=cfg["layers"], lora_rank=cfg["lora_rank"],
                   lora_alpha=cfg["lora_alpha"], aux_loss_coef=cfg["aux_loss_coef"], z_loss_coef=cfg["z_loss_coef"],
                   router_jitter=cfg["router_jitter"], dispatch=cfg["dispatch"], verbose=verbose)


def setup_ddp(cfg):
    """Under torchrun (RANK is set) start the process group as nanoGPT does. Returns (rank, world, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, cfg["device"]
    dist.init_process_group(backend=cfg["backend"])
    rank, world = dist.get_rank(), dist.get_world_size()
    device = cfg["device"]
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if cfg["gradient_accumulation_steps"] % world:
        raise ValueError(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be a multiple "
                         f"of the number of processes ({world}): each rank runs an equal share of the micro-steps")
    return rank, world, device


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -----------------------------------------------------------------------------

def main(argv):
    cfg = parse_config(argv, DEFAULTS)
    if cfg["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg['method']!r}")
    for key in ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "pretrain_iters"):
        if cfg[key] <= 0:
            raise ValueError(f"{key} must be positive, got {cfg[key]}")
    if cfg["dataset"] != "embedded" and not os.path.isfile(cfg["dataset"]):
        raise FileNotFoundError(f"dataset file {cfg['dataset']} does not exist; give an Alpaca .json or a "
                                f".jsonl file (Alpaca or chat records), or dataset=embedded")
    rank, world, device = setup_ddp(cfg)
    master = rank == 0
    device_type = device.split(":")[0]
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    ctx = nullcontext() if device_type == "cpu" or ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    t_start = time.time()
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    say = print if master else (lambda *a, **k: None)

    # stages 1 + 2: the dense base, then upcycling (or the state of an interrupted run)
    resume = None
    if cfg["init_from"] == "resume":
        resume = read_checkpoint(ckpt_path)
        if resume.get("method") != cfg["method"]:
            raise ValueError(f"{ckpt_path} was trained with method={resume.get('method')!r}, not {cfg['method']!r}")
        model, tok_name, base_ref = build_model(resume, ckpt_path), resume["tokenizer"], resume["base"]
        say(f"resuming {ckpt_path} at step {resume['iter_num']}")
    else:
        model, tok_name, base_ref = load_base(cfg, device, ctx, master)
        torch.manual_seed(cfg["seed"])  # routers and adapters do not depend on how the base was made
        apply_method(model, cfg, verbose=master)
    torch.manual_seed(cfg["seed"] + rank)  # per-rank seed: dropout differs across ranks, data order does not
    model.to(device)
    enc = load_tokenizer(tok_name)
    pad_id = eot_id = enc.eot_token
    counts = count_params(model)

    # data: the embedded instruction set, or the user's file (10 % of it, at most n_val, held out)
    if cfg["dataset"] == "embedded":
        split = make_instruction_set(seed=cfg["data_seed"], n_train=cfg["n_train"], n_val=cfg["n_val"])
        train_examples, val_examples = split["train"], split["val"]
    else:
        examples = load_instruction_file(cfg["dataset"])
        random.Random(cfg["seed"]).shuffle(examples)
        n_held = max(1, min(cfg["n_val"], len(examples) // 10))
        train_examples, val_examples = examples[n_held:], examples[:n_held]
    bs = model.config.block_size
    train_enc = encode_dataset(enc, train_examples, bs, eot_id)
    val_enc = encode_dataset(enc, val_examples, bs, eot_id)
    say(f"instruction data: {len(train_enc)} train / {len(val_enc)} held-out examples "
        f"({len(train_examples) - len(train_enc)} dropped: nothing of the response fit in block_size={bs})")

    raw_model = model  # the module we evaluate and save: never the compiled or DDP wrapper
    if cfg["compile"]:
        model = torch.compile(model)
    if world > 1:
        # experts that no token picked get no gradient in the loop dispatch: tell DDP to expect that
        unused = cfg["method"] == "sparse" or cfg["dispatch"] == "loop"
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None,
                    find_unused_parameters=unused)
    optimizer = make_optimizer(raw_model, cfg["learning_rate"], cfg["weight_decay"], device_type)
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    start_step, before = 0, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        start_step, before = resume["iter_num"], resume["before"]
        torch.set_rng_state(resume["rng"]["torch"])
    elif master:
        open(log_path, "w").close()
        val_loss, ec = response_loss(raw_model, val_enc, cfg["batch_size"], pad_id, device, ctx)
        acc = exact_match(raw_model, enc, val_examples, cfg["eval_max_new_tokens"], device, ctx, "eval base")
        before = dict(val_loss=val_loss, exact_match=acc)
        log_row(log_path, dict(step=0, stage="before", val_loss=val_loss, exact_match=acc, expert_load=load_summary(ec)))
        say(f"before tuning: held-out response loss {val_loss:.4f}, exact match {fmt_acc(acc)}")

    def checkpoint(step):
        if master:
            extra = dict(tokenizer=tok_name, method=cfg["method"], iter_num=step, optimizer=optimizer.state_dict(),
                         config=cfg, before=before, rng=dict(torch=torch.get_rng_state()))
            save_checkpoint(ckpt_path, make_checkpoint(raw_model, base_ref, extra))

    # stage 3: instruction tuning
    total, decay_total = cfg["max_iters"], cfg["lr_decay_iters"] or cfg["max_iters"]
    accum = cfg["gradient_accumulation_steps"]
    local_accum = accum // world          # each rank runs its share of the micro-steps
    losses, row, done = [], None, start_step  # done: optimizer steps applied to the weights
    step_times = []                       # wall time of each training step, evaluation excluded
    train_counts = None                   # routing counts of the training batches since the last eval
    bar = tqdm(range(start_step, total), desc=f"tune ({cfg['method']})", initial=start_step, total=total,
               disable=not master)
    try:
        for step in bar:
            lr = lr_at(step, decay_total, cfg["learning_rate"], cfg["warmup_frac"], cfg["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            step_loss = torch.zeros((), device=device)
            tokens = 0
            for micro in range(local_accum):
                global_micro = step * accum + rank * local_accum + micro  # the same batches for any world size
                batch = tune_batch(train_enc, global_micro, cfg["batch_size"], cfg["seed"], pad_id)
                tokens += int(batch[2].sum())  # counted on the host copy: no GPU sync per micro-step
                idx, targets, mask = (t.to(device) for t in batch)
                if world > 1:
                    model.require_backward_grad_sync = micro == local_accum - 1  # all-reduce once per step
                with ctx:
                    _, loss = model(idx, targets, mask)
                (loss / local_accum).backward()  # DDP averages over ranks: together a mean over all micro-steps
                step_loss += loss.detach() / accum
                train_counts = add_routing_counts(train_counts, raw_model)
            step_loss = float(all_reduce_sum(step_loss))
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"the loss is {step_loss} at step {step}; stopped without saving this "
                                         f"state (the last good checkpoint, if any, is {ckpt_path}). Lower "
                                         f"learning_rate or check the data.")
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if device_type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.time() - t0)
            losses.append(step_loss)
            if step % cfg["log_interval"] == 0:
                postfix = dict(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if device_type == "cuda":  # MFU from the *active* parameters: what a token actually touches
                    mfu = 6 * counts["active"] * tokens * world / step_times[-1] / cfg["peak_flops"]
                    postfix["mfu"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(**postfix)
            last = step + 1 == total
            if (step + 1) % cfg["eval_interval"] == 0 or last:
                if train_counts is not None:
                    train_counts = all_reduce_sum(train_counts)
                if master:
                    val_loss, ec = response_loss(raw_model, val_enc, cfg["batch_size"], pad_id, device, ctx)
                    aux = float(raw_model.aux_loss) if raw_model.aux_loss is not None else None
                    row = dict(step=step + 1, stage="tune", train_loss=sum(losses) / len(losses), val_loss=val_loss,
                               aux_loss=aux, lr=lr, expert_load=load_summary(ec),
                               train_expert_load=load_summary(None if train_counts is None else train_counts.cpu()),
                               elapsed_s=round(time.time() - t_start, 1))
                    if last:
                        row["exact_match"] = exact_match(raw_model, enc, val_examples, cfg["eval_max_new_tokens"],
                                                         device, ctx, "eval tuned")
                    log_row(log_path, row)
                    tqdm.write(f"step {step + 1}: train {row['train_loss']:.4f} held-out {val_loss:.4f}"
                               + (f" aux {aux:.4f} expert share (min, max) per layer {row['expert_load']}"
                                  if aux is not None else ""))
                    checkpoint(step + 1)
                losses, train_counts = [], None
                if dist.is_initialized():
                    dist.barrier()
    except KeyboardInterrupt:
        checkpoint(done)  # a half-accumulated step is dropped; resuming redoes it from its start
        say(f"\ninterrupted: saved step {done} to {ckpt_path}; continue with --init_from=resume")
        return None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not master:
        return None

    # stages 4 + 5: the report and a few samples
    after = row["exact_match"]
    say(f"\nmethod {cfg['method']}: {counts['total']:,} parameters, {counts['trainable']:,} trainable, "
        f"{counts['active']:,} active per token")
    say(f"{'exact match':<12}{'before':>8}{'after':>8}")
    for fam in [f for f in FAMILIES + ("file",) if f in after] + ["average"]:
        say(f"{fam:<12}{before['exact_match'].get(fam, 0.0):>8.3f}{after[fam]:>8.3f}")
    say(f"held-out response loss: {before['val_loss']:.4f} -> {row['val_loss']:.4f}")
    shown = val_examples[:cfg["n_samples"]]
    for ex, ans in zip(shown, greedy_answers(raw_model, enc, shown, cfg["eval_max_new_tokens"], device, ctx, "samples")):
        say("-" * 60)
        say(format_prompt(ex["instruction"], ex.get("input", "")) + ans + f"    [expected: {ex['output']}]")
    say("-" * 60)
    say(f"total wall time {time.time() - t_start:.0f} s; checkpoint {ckpt_path}, log {log_path}")
    steady = step_times[len(step_times) // 10:] or step_times  # skip warm-up steps
    result = dict(method=cfg["method"], seed=cfg["seed"], before=before, after=after, val_loss=row["val_loss"],
                  counts=counts, step_time_s=statistics.median(steady) if steady else 0.0,  # median: robust to a busy moment
                  checkpoint_bytes=os.path.getsize(ckpt_path), peak_memory_bytes=peak_memory(device_type))
    with open(os.path.join(cfg["out_dir"], "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def peak_memory(device_type):
    """Peak GPU memory allocated, or on a CPU the process's peak resident set size."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def read_log(out_dir):
    """The rows of out_dir/log.jsonl, one dict per evaluation (compare.py and the tests read them)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def log_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def fmt_acc(acc):
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)  # a user mistake or a bad file: the message says what to do
        sys.exit(1)
