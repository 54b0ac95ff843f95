"""
The whole PESC recipe in one file: get a dense base, upcycle it, instruction-tune it, evaluate, sample.

    python train.py                                  # the offline demo: minutes on 2 CPU cores
    python train.py config/compare/common.py config/compare/adapter.py   # config files, then flags on top
    python train.py --method=sparse --max_iters=300  # any setting below can be overridden
    python train.py config/smollm2_pesc.py           # a Llama-family model from the Hugging Face hub

Stages, run in order by main():
1. base: init_from="base" (default) loads base_ckpt, or pretrains a small dense GPT on the Python
   documentation that ships inside CPython (data/pydocs.py) when it is not there yet; "scratch"
   always pretrains; a Hugging Face repo id ("gpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B")
   or folder loads those weights (pretrained.py); a path to a .pt loads a full checkpoint written by
   this script; "resume" continues out_dir/ckpt.pt.
2. upcycle: method="pesc" (upcycle.py), "sparse" (sparse upcycling), "adapter" (the paper's
   baseline without experts: one adapter per FFN), "lora" (the paper's "Camel" baseline: LoRA only) or "full" (a full
   fine-tune of every weight, no experts).
3. data: the embedded instruction set (data/instruct.py), a file, a URL, or "alpaca"; loss on the
   response tokens only.
4. tune: AdamW, warmup + cosine; held-out response loss every eval_interval steps, one JSON line
   per evaluation in out_dir/log.jsonl (cross-entropy and the MoE aux loss logged separately),
   checkpoints (atomic; PESC's hold only the tuned tensors), exact resume, DDP under torchrun.
5. report: exact match per task family before and after, a few greedy samples, out_dir/result.json.
"""

import json
import math
import os
import random
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (base_reference, build_model, make_checkpoint, read_checkpoint, rng_state, save_checkpoint,
                        set_rng_state)
from configurator import parse_config, settings
from costs import mfu, training_flops_per_token
from data.instruct import (FAMILIES, batch_at, encode_dataset, format_prompt, load_instruction_file,
                           make_instruction_set)
from data.pydocs import encode_corpus, load_pydocs_documents, pretrain_batch, train_val_split
from evaluate import add_counts, exact_match, greedy_answers, load_summary, log_row, response_loss
from hub import DATASETS, fetch_dataset, is_url
from model import GPT, GPTConfig
from moe import check_dispatch
from optim import lr_at, make_optimizer
from tokenizer import byte_tokenizer, load_tokenizer
from upcycle import METHODS as UPCYCLE_METHODS
from upcycle import RENAMED_METHODS, count_params, upcycle

# -----------------------------------------------------------------------------
# default config: the offline CPU demo. Every setting here can be set by a config/*.py file or --key=value.
# I/O
out_dir = "out"                 # tuned checkpoint (ckpt.pt), log.jsonl and result.json go here
base_ckpt = "out/base.pt"       # the cached pretrained base (init_from="base")
init_from = "base"              # "base" | "scratch" | "resume" | a .pt base | a Hugging Face repo id or folder
eval_interval = 200             # held-out response loss (and a checkpoint) every this many tuning steps
log_interval = 10               # progress-bar update and the non-finite-loss check every this many steps
eval_max_new_tokens = 16        # greedy decoding budget for exact match
n_samples = 6                   # greedy samples printed at the end
seed = 1337
# base model (pretrained from scratch when init_from is "base" or "scratch")
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128                # the base's context; tuning sequences are cut to this (or the model's, if shorter)
bias = True
dropout = 0.0                   # in the model's attention and FFN outputs (also applied to a loaded base)
load_dtype = "float32"          # Hugging Face weights loaded as "float32" or "bfloat16" (half the memory)
# pretraining of the base (only when it is not cached)
pretrain_iters = 1000
pretrain_batch_size = 8         # small batches, more steps: at half the tokens of 32 x 600 the held-out
                                # docs loss is 1.60 with batches of 8 and 1.79 with 16 (README, "Time")
pretrain_lr = 3e-3
# upcycling
method = "pesc"                 # "pesc" | "sparse" | "adapter" | "lora" | "full"
n_experts = 8
top_k = 2
adapter_dim = 32
adapter_scale = 1.0
adapter_dropout = 0.0           # inside each expert, before W_down (the official recipe: 0.1)
layers = "all"                  # "all" | "every_other"
lora_rank = 8                   # LoRA rank; 0 = no LoRA
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "attention"      # "attention" | "all" (the paper's QLoRA recipe: the FFN projections too)
aux_loss_coef = 0.01            # alpha in Eq. 10 (the aux loss is the sum of every MoE layer's)
z_loss_coef = 0.0
router_jitter = 0.0
dispatch = "auto"               # "auto" | "loop" | "masked" | "grouped" | "kernels" (see moe.py)
quantize_base = False           # 4-bit NF4 frozen attention and FFN projections (QLoRA; quant.py)
# instruction tuning
dataset = "embedded"            # "embedded", a .json/.jsonl file, an https URL, or "alpaca"
n_train = 6000                  # size of the embedded instruction set
data_seed = 1337                # the embedded set's generator seed: fixed, so runs of any seed share the data
n_val = 300
max_iters = 850
lr_decay_iters = 0              # length of the warmup + cosine schedule; 0 = max_iters
batch_size = 32                 # per micro-step and per process
gradient_accumulation_steps = 1
learning_rate = 5e-3
min_lr_ratio = 0.1              # cosine decays to learning_rate * min_lr_ratio
warmup_frac = 0.03              # the paper's 3 % warmup
weight_decay = 0.0              # the paper uses none; only matrices would get it, never norms/biases/routers
grad_clip = 1.0
grad_checkpointing = False      # recompute each block's activations in backward: less memory, ~30 % more time
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
torch_compile = False           # torch.compile the model (the uncompiled module is what gets saved)
backend = "nccl" if torch.cuda.is_available() else "gloo"  # DDP backend under torchrun
peak_flops = 0.0                # for MFU; 0 = H100/H200 peak (no sparsity) for dtype (989e12 bf16, 494e12 TF32)
print_config = False            # print the final settings (after config files and flags) and stop
# -----------------------------------------------------------------------------
DEFAULTS = settings(globals())   # the config above, before anything else is defined
METHODS = UPCYCLE_METHODS + ("full",)   # "full": every weight trains, nothing is upcycled
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_settings(cfg):
    """Settings that parse but cannot work: a clear error before anything runs."""
    if cfg["method"] in RENAMED_METHODS:
        raise ValueError(f"method={cfg['method']!r} was renamed: use --method={RENAMED_METHODS[cfg['method']]}")
    if cfg["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg['method']!r}")
    for key in ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "pretrain_iters",
                "log_interval"):
        if cfg[key] <= 0:
            raise ValueError(f"{key} must be positive, got {cfg[key]}")
    for key in ("dtype", "load_dtype"):
        if cfg[key] == "float16":
            raise ValueError(f"{key}=float16 needs loss scaling (a GradScaler), which train.py does not do; use "
                             f"bfloat16 (GPUs since Ampere) or float32")
        if cfg[key] not in DTYPES:
            raise ValueError(f"{key} must be one of {tuple(DTYPES)}, got {cfg[key]!r}")
    check_dispatch(cfg["dispatch"])
    dataset = cfg["dataset"]
    if dataset != "embedded" and dataset not in DATASETS and not is_url(dataset) and not os.path.isfile(dataset):
        raise FileNotFoundError(f"dataset file {dataset} does not exist; give an Alpaca .json or a .jsonl file "
                                f"(Alpaca or chat records), an https URL, one of {sorted(DATASETS)}, or embedded")
    if cfg["quantize_base"] and cfg["method"] == "full":
        raise ValueError("quantize_base=True freezes the base in 4 bits: it needs a parameter-efficient method "
                         "(pesc, adapter, lora), not method=full")


# -----------------------------------------------------------------------------
# the run: process group, device, precision

def setup(cfg):
    """Under torchrun (RANK is set) start the process group as nanoGPT does; seeds, TF32, autocast."""
    rank, world, device = 0, 1, cfg["device"]
    if int(os.environ.get("RANK", -1)) != -1:
        dist.init_process_group(backend=cfg["backend"])
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        if cfg["gradient_accumulation_steps"] % world:
            raise ValueError(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be a multiple "
                             f"of the number of processes ({world}): each rank runs an equal share of the micro-steps")
    device_type = device.split(":")[0]
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = DTYPES[cfg["dtype"]]
    autocast = device_type != "cpu" and ptdtype != torch.float32
    os.makedirs(cfg["out_dir"], exist_ok=True)
    return SimpleNamespace(rank=rank, world=world, master=rank == 0, device=device, device_type=device_type,
                           ctx=torch.autocast(device_type, dtype=ptdtype) if autocast else nullcontext(),
                           say=print if rank == 0 else (lambda *a, **k: None), t_start=time.time(),
                           ckpt_path=os.path.join(cfg["out_dir"], "ckpt.pt"),
                           log_path=os.path.join(cfg["out_dir"], "log.jsonl"))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# -----------------------------------------------------------------------------
# stage 1: the dense base

def pretrain_base(cfg, run):
    """Pretrains a small dense GPT on CPython's own documentation and saves it to base_ckpt."""
    tok = byte_tokenizer()
    ids = encode_corpus(tok, load_pydocs_documents())
    train_ids, val_ids = train_val_split(ids)
    config = GPTConfig(block_size=cfg["block_size"], vocab_size=64 * math.ceil(tok.n_vocab / 64), n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"], bias=cfg["bias"])
    torch.manual_seed(cfg["seed"])
    model = GPT(config).to(run.device)
    print(f"pretraining a dense base on the Python docs ({len(ids):,} byte tokens): "
          f"{count_params(model)['total']:,} parameters, {cfg['pretrain_iters']} steps")
    opt = make_optimizer(model, cfg["pretrain_lr"], 0.1, run.device_type)
    total = cfg["pretrain_iters"]
    for step in (bar := tqdm(range(total), desc="pretrain base")):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg["pretrain_lr"], 0.05, 0.1)
        x, y = (t.to(run.device) for t in pretrain_batch(train_ids, step, cfg["pretrain_batch_size"],
                                                         config.block_size, cfg["seed"]))
        with run.ctx:
            _, loss, _ = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad(), run.ctx:
        vals = [model(*(t.to(run.device) for t in pretrain_batch(val_ids, i, 32, config.block_size, cfg["seed"] + 1)))[1]
                for i in range(4)]
    print(f"base: held-out docs loss {float(torch.stack(vals).mean()):.3f} nats/byte")
    save_checkpoint(cfg["base_ckpt"], make_checkpoint(model.cpu(), None, dict(tokenizer=tok.spec)))
    print(f"saved the base to {cfg['base_ckpt']}")


def load_base(cfg, run):
    """Returns (dense model on the CPU, tokenizer, the base reference for delta checkpoints; None where
    none will be written: a full fine-tune, or a rank other than 0)."""
    init = cfg["init_from"]

    def reference(path, fmt, dtype=None):
        # only delta checkpoints name their base, and only rank 0 writes them: hash the weights there alone
        return base_reference(path, fmt, dtype) if run.master and cfg["method"] != "full" else None

    if init in ("base", "scratch"):   # rank 0 decides and pretrains; every rank meets at the barrier
        if run.master and (init == "scratch" or not os.path.exists(cfg["base_ckpt"])):
            pretrain_base(cfg, run)
        barrier()
        init = "base"
    if init == "base" or init.endswith(".pt"):
        path = cfg["base_ckpt"] if init == "base" else init
        ckpt = read_checkpoint(path)
        if ckpt["kind"] != "full":
            raise ValueError(f"{path} is a tuned checkpoint; init_from needs a full one (a base, or a full "
                             f"fine-tune); use --init_from=resume to continue tuning")
        if init == "base":
            wanted = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
            have = {k: ckpt["model_args"][k] for k in wanted}
            if have != wanted:
                raise ValueError(f"the cached base {path} has {have}, but the config asks for {wanted}; use "
                                 f"--init_from=scratch to pretrain a new base, or set base_ckpt to another path")
        run.say(f"loaded the dense base from {path}")
        model = build_model(ckpt, path, dropout=cfg["dropout"])
        return model, load_tokenizer(ckpt["tokenizer"]), reference(path, "train.py")
    from pretrained import resolve, tokenizer_for   # a Hugging Face checkpoint: downloaded once if need be
    source = resolve(init)
    dtype = None if cfg["load_dtype"] == "float32" else DTYPES[cfg["load_dtype"]]   # None: fp32
    model = GPT.from_pretrained(source, dtype=dtype, dropout=cfg["dropout"])
    run.say(f"loaded {init} from {source}")
    return model, tokenizer_for(source), reference(source, "hf", dtype)


def prepare(model, cfg, verbose):
    """Stage 2: turns the dense base into what cfg["method"] tunes, in place (upcycle.py)."""
    if cfg["method"] == "full":
        return model.requires_grad_(True)
    keys = ("n_experts", "top_k", "adapter_dim", "adapter_scale", "adapter_dropout", "layers", "lora_rank",
            "lora_alpha", "lora_dropout", "lora_targets", "aux_loss_coef", "z_loss_coef", "router_jitter",
            "dispatch", "quantize_base")
    return upcycle(model, cfg["method"], **{k: cfg[k] for k in keys}, verbose=verbose)


def stage_model(cfg, run):
    """Stages 1 + 2: the base, upcycled -- or the model of an interrupted run (init_from="resume")."""
    if cfg["init_from"] == "resume":
        resume = read_checkpoint(run.ckpt_path)
        if resume.get("method") != cfg["method"]:
            raise ValueError(f"{run.ckpt_path} was trained with method={resume.get('method')!r}, not {cfg['method']!r}")
        model = build_model(resume, run.ckpt_path, dropout=cfg["dropout"])
        run.say(f"resuming {run.ckpt_path} at step {resume['iter_num']}")
        tok, base_ref = load_tokenizer(resume["tokenizer"]), resume.get("base")   # a full fine-tune has no base
    else:
        resume = None
        model, tok, base_ref = load_base(cfg, run)
        torch.manual_seed(cfg["seed"])  # routers and adapters do not depend on how the base was made
        prepare(model, cfg, verbose=run.master)
    model.gradient_checkpointing = cfg["grad_checkpointing"]
    torch.manual_seed(cfg["seed"] + run.rank)  # per-rank seed: dropout differs across ranks, data order does not
    return model.to(run.device), tok, base_ref, resume


# -----------------------------------------------------------------------------
# stage 3: the instruction data

def stage_data(cfg, tok, model, run):
    """The embedded instruction set, or the user's file (10 % of it, at most n_val, held out)."""
    if cfg["dataset"] == "embedded":
        split = make_instruction_set(seed=cfg["data_seed"], n_train=cfg["n_train"], n_val=cfg["n_val"])
        train_examples, val_examples = split["train"], split["val"]
    else:
        examples = load_instruction_file(fetch_dataset(cfg["dataset"]))   # a URL or "alpaca": downloaded once
        random.Random(cfg["data_seed"]).shuffle(examples)   # the same held-out split for every seed
        n_held = max(1, min(cfg["n_val"], len(examples) // 10))
        train_examples, val_examples = examples[n_held:], examples[:n_held]
    seq_len = min(cfg["block_size"], model.config.block_size)
    train_enc = encode_dataset(tok, train_examples, seq_len)
    val_enc = encode_dataset(tok, val_examples, seq_len)
    run.say(f"instruction data: {len(train_enc)} train / {len(val_enc)} held-out examples "
            f"({len(train_examples) - len(train_enc)} dropped: nothing of the response fit in {seq_len} tokens)")
    return SimpleNamespace(train=train_enc, val=val_enc, val_examples=val_examples)


class Batches:
    """Training micro-batches on the device, one ahead: when batch i is handed out, batch i + 1 is
    built on the host and (on a GPU) pinned and queued for a non-blocking copy, so that the loop
    never waits on a host-to-device transfer. The padding mask stays on the host: the model finds
    the real tokens there (model.py, Unpadded) without waiting on the GPU. Batch i depends only on
    (seed, i): see batch_at."""

    def __init__(self, encoded, batch_size, seed, pad_id, device):
        self.args, self.device, self.ahead = (encoded, batch_size, seed, pad_id), device, None
        self.cuda = torch.device(device).type == "cuda"

    def fetch(self, i):
        idx, targets, mask = batch_at(self.args[0], i, *self.args[1:])
        if self.cuda:
            idx, targets = idx.pin_memory(), targets.pin_memory()
        return i, [t.to(self.device, non_blocking=self.cuda) for t in (idx, targets)] + [mask]

    def get(self, i, next_i):
        """(idx, targets) of batch i on the device and its mask on the host; batch next_i starts on its way."""
        got = self.ahead if self.ahead is not None and self.ahead[0] == i else self.fetch(i)
        self.ahead = self.fetch(next_i)
        return got[1]


# -----------------------------------------------------------------------------
# stage 4: instruction tuning

def train_step(model, raw, optimizer, batches, step, cfg, run):
    """One optimizer step over the micro-steps of this rank. Returns (cross-entropy, aux loss,
    expert counts, real tokens) with the losses as device tensors: nothing here waits on the GPU."""
    accum, local_accum = cfg["gradient_accumulation_steps"], cfg["gradient_accumulation_steps"] // run.world
    ce_sum = torch.zeros((), device=run.device)
    aux_sum = torch.zeros((), device=run.device)
    counts, tokens = None, 0
    for micro in range(local_accum):
        i = step * accum + run.rank * local_accum + micro     # the same global batches for any world size
        next_i = i + 1 if micro + 1 < local_accum else (step + 1) * accum + run.rank * local_accum
        idx, targets, mask = batches.get(i, next_i)
        if run.world > 1:
            model.require_backward_grad_sync = micro == local_accum - 1   # all-reduce once per step
        with run.ctx:
            _, ce, routing = model(idx, targets, mask)
            aux = routing.aux_loss if routing is not None else torch.zeros((), device=run.device)
        ((ce + aux) / local_accum).backward()   # DDP averages over ranks: together a mean over all micro-steps
        ce_sum += ce.detach() / accum
        aux_sum += aux.detach() / accum
        counts, tokens = add_counts(counts, routing), tokens + int(mask.sum())   # real tokens; the mask is on the host
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.requires_grad], cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce_sum, aux_sum, counts, tokens


NEVER = 2**62   # "no bad step yet"


def first_nonfinite(first_bad, loss, step):
    """Device-side: the first step whose loss was NaN/inf (a large number while none was). Read only
    on log steps, so that the loop does not wait on the GPU every step."""
    return torch.where(torch.isfinite(loss), first_bad, torch.minimum(first_bad, torch.full_like(first_bad, step)))


def check_finite(first_bad, run):
    """Stops the run, naming the step, if any rank's loss went NaN/inf; nothing of that state is saved."""
    step = int(all_reduce(first_bad.clone(), dist.ReduceOp.MIN))
    if step < NEVER:
        raise FloatingPointError(f"the loss is not finite (NaN or inf) at step {step}; stopped without saving "
                                 f"this state (the last good checkpoint, if any, is {run.ckpt_path}). Lower "
                                 f"learning_rate or check the data.")



def evaluate_before(raw, tok, data, cfg, run):
    """The base before tuning (after upcycling it computes the same function): the log's first row."""
    open(run.log_path, "w").close()
    val_loss, ec = response_loss(raw, data.val, cfg["batch_size"], tok.pad_id, run.device, run.ctx)
    acc = exact_match(raw, tok, data.val_examples, cfg["eval_max_new_tokens"], run.device, run.ctx, "eval base")
    log_row(run.log_path, dict(step=0, stage="before", val_loss=val_loss, exact_match=acc, expert_load=load_summary(ec)))
    run.say(f"before tuning: held-out response loss {val_loss:.4f}, exact match {fmt_acc(acc)}")
    return dict(val_loss=val_loss, exact_match=acc)


def save(raw, optimizer, step, before, rng, base_ref, tok, cfg, run):
    if run.master:
        extra = dict(tokenizer=tok.spec, method=cfg["method"], iter_num=step, optimizer=optimizer.state_dict(),
                     config=cfg, before=before, rng=rng)
        save_checkpoint(run.ckpt_path, make_checkpoint(raw, base_ref, extra))


def stage_tune(cfg, run, model, tok, data, base_ref, resume):
    """Stage 4. Returns the last evaluation row and the before-tuning figures, or None when
    interrupted (Ctrl-C saves at the end of the step under way)."""
    raw = model  # the module we evaluate and save: never the compiled or DDP wrapper
    if cfg["torch_compile"]:
        model = torch.compile(model)
    if run.world > 1:  # sparse upcycling's unused FFN copies get no gradient; PESC's stacked experts always do
        # every buffer (RoPE frequencies, a 4-bit base's codes) is constant: nothing to broadcast each step
        model = DDP(model, device_ids=[torch.device(run.device).index] if run.device_type == "cuda" else None,
                    find_unused_parameters=cfg["method"] == "sparse", broadcast_buffers=False)
    optimizer = make_optimizer(raw, cfg["learning_rate"], cfg["weight_decay"], run.device_type)
    start, before = 0, None
    if resume is not None:
        start, before = resume["iter_num"], resume["before"]
        if start >= cfg["max_iters"]:
            raise ValueError(f"{run.ckpt_path} is at step {start} already: raise --max_iters to tune further")
        optimizer.load_state_dict(resume["optimizer"])
        restore_rng_states(resume["rng"], cfg, run, start)
    elif run.master:
        before = evaluate_before(raw, tok, data, cfg, run)
    barrier()
    loop = SimpleNamespace(step=start, last=None, step_times=[], tokens_per_s=[], mfu=[], interrupted=False,
                           stopped=False, first_bad=None)
    # Ctrl-C finishes the step under way, then saves it: an interrupt in the middle of a step (say,
    # half-way through the optimizer's update) would save weights that no step number describes.
    # A second Ctrl-C stops at once.
    def finish_step_then_stop(signum, frame):
        loop.interrupted = True
        signal.signal(signal.SIGINT, previous)
        run.say("\ninterrupt: finishing this step, then saving (Ctrl-C again to stop at once, unsaved)")
    previous = signal.signal(signal.SIGINT, finish_step_then_stop)
    try:
        tune_loop(model, raw, optimizer, loop, before, base_ref, tok, data, cfg, run)
    finally:
        signal.signal(signal.SIGINT, previous)
    if loop.stopped:
        check_finite(loop.first_bad, run)   # a NaN since the last log step is never saved
        save(raw, optimizer, loop.step, before, gathered_rng_states(run), base_ref, tok, cfg, run)
        run.say(f"interrupted: saved step {loop.step} to {run.ckpt_path}; continue with --init_from=resume")
        return None
    return SimpleNamespace(before=before, last=loop.last, step_times=loop.step_times, tokens_per_s=loop.tokens_per_s,
                           mfu=loop.mfu)


def stop_now(loop, run, log_step):
    """Whether Ctrl-C stops the loop at this step boundary. One process stops at the next boundary;
    under DDP the ranks (which each get the signal, at slightly different moments) agree on log
    steps, so that all of them stop after the same step."""
    if run.world == 1:
        return loop.interrupted
    if not log_step:
        return False
    return bool(all_reduce(torch.tensor(int(loop.interrupted), device=run.device), dist.ReduceOp.MAX))


def gathered_rng_states(run):
    """Every rank's generator states (each rank draws its own dropout masks), for rank 0 to save."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * run.world
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states, cfg, run, step):
    """Each rank continues its own random stream; a rank the checkpoint has no state for (the world
    grew) starts a new one from the seed, the rank and the step (then the resume is not exact)."""
    if run.rank < len(states):
        set_rng_state(states[run.rank])
    else:
        torch.manual_seed(cfg["seed"] + run.rank + 1_000_003 * step)


def tune_loop(model, raw, optimizer, loop, before, base_ref, tok, data, cfg, run):
    total, decay_total = cfg["max_iters"], cfg["lr_decay_iters"] or cfg["max_iters"]
    param_counts = count_params(raw)
    batches = Batches(data.train, cfg["batch_size"], cfg["seed"], tok.pad_id, run.device)
    sums = SimpleNamespace(ce=0.0, aux=0.0, counts=None, steps=0)
    loop.first_bad = torch.full((), NEVER, dtype=torch.long, device=run.device)
    t_last, steps_timed, tokens_timed = time.time(), 0, 0
    bar = tqdm(range(loop.step, total), desc=f"tune ({cfg['method']})", initial=loop.step, total=total,
               disable=not run.master)
    for step in bar:
        if stop_now(loop, run, step % cfg["log_interval"] == 0):   # Ctrl-C: stage_tune saves
            loop.stopped = True
            break
        lr = lr_at(step, decay_total, cfg["learning_rate"], cfg["warmup_frac"], cfg["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        ce, aux, step_counts, tokens = train_step(model, raw, optimizer, batches, step, cfg, run)
        loop.first_bad = first_nonfinite(loop.first_bad, ce + aux, step)
        loop.step = step + 1
        sums.ce, sums.aux, sums.steps = sums.ce + ce, sums.aux + aux, sums.steps + 1
        if step_counts is not None:
            sums.counts = step_counts if sums.counts is None else sums.counts + step_counts
        steps_timed, tokens_timed = steps_timed + 1, tokens_timed + tokens
        is_eval = (step + 1) % cfg["eval_interval"] == 0 or step + 1 == total
        if step % cfg["log_interval"] == 0 or is_eval:
            check_finite(loop.first_bad, run)     # the one wait on the GPU per log_interval steps
            if run.device_type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            loop.step_times.append((now - t_last) / steps_timed)
            # real tokens (padding is never computed); this rank's times the world size (alike on average)
            loop.tokens_per_s.append(tokens_timed * run.world / (now - t_last))
            postfix = dict(loss=f"{float(ce):.4f}", lr=f"{lr:.2e}")
            if run.device_type == "cuda":   # MFU by the FLOPs a tuned token really costs (costs.py)
                micro_batches = steps_timed * (cfg["gradient_accumulation_steps"] // run.world)
                seq_len = tokens_timed // micro_batches // cfg["batch_size"]
                per_token = training_flops_per_token(param_counts, raw.config.n_layer, seq_len, raw.config.n_embd)
                loop.mfu.append(mfu(per_token * loop.tokens_per_s[-1], cfg["dtype"], cfg["peak_flops"]))
                postfix["mfu"] = f"{100 * loop.mfu[-1]:.1f}%"
            bar.set_postfix(**postfix)
            t_last, steps_timed, tokens_timed = now, 0, 0
        if is_eval:
            loop.last = evaluate_and_save(raw, optimizer, step + 1, sums, lr, before, base_ref, tok, data, cfg, run)
            sums = SimpleNamespace(ce=0.0, aux=0.0, counts=None, steps=0)
            t_last = time.time()   # evaluation time is not step time


def evaluate_and_save(raw, optimizer, step, sums, lr, before, base_ref, tok, data, cfg, run):
    """Held-out loss, a log row, a checkpoint (rank 0); routing counts summed over ranks."""
    # each rank summed ce / accum over its share of the micro-steps: the sum over ranks is the mean per step
    train_ce = float(all_reduce(torch.as_tensor(sums.ce, device=run.device).clone())) / sums.steps
    train_aux = float(all_reduce(torch.as_tensor(sums.aux, device=run.device).clone())) / sums.steps
    train_counts = None if sums.counts is None else all_reduce(sums.counts).cpu()
    rng = gathered_rng_states(run)
    row = None
    if run.master:
        val_loss, ec = response_loss(raw, data.val, cfg["batch_size"], tok.pad_id, run.device, run.ctx)
        row = dict(step=step, stage="tune", train_loss=train_ce, aux_loss=train_aux if sums.counts is not None else None,
                   val_loss=val_loss, lr=lr, expert_load=load_summary(ec), train_expert_load=load_summary(train_counts),
                   elapsed_s=round(time.time() - run.t_start, 1))
        if step == cfg["max_iters"]:
            row["exact_match"] = exact_match(raw, tok, data.val_examples, cfg["eval_max_new_tokens"], run.device,
                                             run.ctx, "eval tuned")
        log_row(run.log_path, row)
        tqdm.write(f"step {step}: train cross-entropy {train_ce:.4f} held-out {val_loss:.4f}"
                   + (f" aux {train_aux:.4f} expert share (min, max) per layer {row['expert_load']}"
                      if sums.counts is not None else ""))
        save(raw, optimizer, step, before, rng, base_ref, tok, cfg, run)
    barrier()
    return row


# -----------------------------------------------------------------------------
# stage 5: the report

def stage_report(cfg, run, model, tok, data, outcome):
    """Exact match before and after, a few samples, result.json (what compare.py reads)."""
    before, last = outcome.before, outcome.last
    after, counts = last["exact_match"], count_params(model)
    run.say(f"\nmethod {cfg['method']}: {counts['total']:,} parameters, {counts['trainable']:,} trainable, "
            f"{counts['active']:,} active per token")
    run.say(f"{'exact match':<12}{'before':>8}{'after':>8}")
    for fam in [f for f in FAMILIES + ("file",) if f in after] + ["average"]:
        run.say(f"{fam:<12}{before['exact_match'].get(fam, 0.0):>8.3f}{after[fam]:>8.3f}")
    run.say(f"held-out response loss: {before['val_loss']:.4f} -> {last['val_loss']:.4f}")
    shown = data.val_examples[:cfg["n_samples"]]
    for ex, ans in zip(shown, greedy_answers(model, tok, shown, cfg["eval_max_new_tokens"], run.device, run.ctx, "samples")):
        run.say("-" * 60)
        run.say(format_prompt(ex["instruction"], ex.get("input", "")) + ans + f"    [expected: {ex['output']}]")
    run.say("-" * 60)
    run.say(f"total wall time {time.time() - run.t_start:.0f} s; checkpoint {run.ckpt_path}, log {run.log_path}")
    def steady_median(values):   # the log intervals after the first tenth (warm-up, compilation)
        steady = values[len(values) // 10:] or values
        return statistics.median(steady) if steady else None
    result = dict(method=cfg["method"], seed=cfg["seed"], before=before, after=after, val_loss=last["val_loss"],
                  counts=counts, step_time_s=steady_median(outcome.step_times) or 0.0,
                  tokens_per_s=steady_median(outcome.tokens_per_s), mfu=steady_median(outcome.mfu),
                  checkpoint_bytes=os.path.getsize(run.ckpt_path), peak_memory_bytes=peak_memory(run.device_type))
    with open(os.path.join(cfg["out_dir"], "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def peak_memory(device_type):
    """Peak GPU memory allocated, or on a CPU the process's peak resident set size."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def fmt_acc(acc):
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())


# -----------------------------------------------------------------------------

def main(argv):
    cfg = parse_config(argv, DEFAULTS)
    check_settings(cfg)
    if cfg["print_config"]:
        print("\n".join(f"{k} = {v!r}" for k, v in cfg.items() if k != "print_config"))
        return cfg
    run = setup(cfg)
    try:
        model, tok, base_ref, resume = stage_model(cfg, run)    # stages 1 + 2
        data = stage_data(cfg, tok, model, run)                 # stage 3
        outcome = stage_tune(cfg, run, model, tok, data, base_ref, resume)   # stage 4
        if outcome is None or not run.master:
            return None
        return stage_report(cfg, run, model, tok, data, outcome)  # stage 5
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, FloatingPointError, ImportError) as e:   # OSError: files, downloads, disks
        print(f"error: {e}", file=sys.stderr)  # a user mistake or a bad file: the message says what to do
        sys.exit(1)
    except KeyboardInterrupt:   # before tuning started (once it has, stage_tune saves and returns)
        print("\ninterrupted before tuning started: nothing to save", file=sys.stderr)
        sys.exit(130)
