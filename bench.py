"""
Benchmarks, each measured in one run with the candidates interleaved (a busy moment of the machine
slows all of them alike), reported as medians and ratios.

  python bench.py                      the MoE layer alone: loop / masked / grouped / kernels (GPU) /
                                       masked under torch.compile (--compile), forward and forward+backward,
                                       over token counts N, expert counts E, balanced and skewed routing
  python bench.py --train_step         whole training steps (forward, backward, clipping, AdamW) of the
                                       one-adapter baseline, PESC E=4/8/16 (k=2), sparse upcycling E=8 and a
                                       full fine-tune, on real batches of the embedded instruction set
  python bench.py --memory             a GPT-2-124M-shaped PESC training step with the base in fp32 or
                                       4-bit NF4, with and without gradient checkpointing: peak memory
                                       (RSS on a CPU) and step time, each setting in its own process
  python bench.py --eval               exact match on the demo's held-out prompts with and without the KV
                                       cache (needs out/ckpt.pt from python train.py): time and same answers
  python bench.py --fused              GPU: the part kernels.cu fuses, alone (route + gate-GELU-mask, forward
                                       and backward), its kernels against the eager PyTorch ops they replace

CPU, a few minutes each:
    python bench.py --n 512,2048,8192 --d 256 --r 64 --runs 10
    python bench.py --train_step --d 256 --r 64 --runs 20
    python bench.py --train_step --d 768 --r 64 --layers 2 --runs 10
    python bench.py --memory --runs 3
    python bench.py --eval --runs 3
GPU (H100/H200; builds kernels.cu first if needed):
    python bench.py --out out/bench_gpu.json
    python bench.py --fused --n 512,2048,8192,32768

Layer: a PESC layer around a GPT-2 FFN (d -> 4d -> d, frozen), non-zero adapters, the input requiring
grad (earlier layers train LoRA), bf16 autocast on the GPU with the router in fp32 (--dtype).
"balanced" spreads the tokens over the experts; "skewed" sends most assignments to experts 0 and 1.
Each time is the median of --runs calls after --warmup untimed ones: CUDA events on the GPU,
time.perf_counter on the CPU; the paths of one row run in turn, --runs times.
"""

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import moe
from model import MLP, GPT, GPTConfig
from moe import PESCMoE

PATHS = ("loop", "masked", "grouped", "kernels", "masked-compile")
TARGETS = dict(train_step_quarter=1.15,   # PESC E=8 step / one adapter at r/d = 1/4
               train_step_twelfth=1.10,   # ... at r/d = 1/12 (d = 768, r = 64)
               train_step_e16=1.25)       # PESC E=16 at r/d = 1/4


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train_step", action="store_true", help="time whole training steps (see above)")
    ap.add_argument("--memory", action="store_true", help="peak memory and step time of 4-bit / checkpointing")
    ap.add_argument("--eval", action="store_true", help="exact-match evaluation of a checkpoint with and without the KV cache")
    ap.add_argument("--fused", action="store_true", help="GPU: route + gate-GELU-mask alone, kernels vs eager PyTorch")
    ap.add_argument("--ckpt", default="out/ckpt.pt", help="eval: the checkpoint (default: the demo's)")
    ap.add_argument("--ffn", choices=("gpt2", "none"), default="gpt2",
                    help="layer: the frozen FFN inside (d -> 4d -> d), or none: the adapter mixing alone")
    ap.add_argument("--n", default="512,2048,8192", help="layer: token counts, comma-separated")
    ap.add_argument("--experts", default="8,16", help="layer: expert counts E, comma-separated")
    ap.add_argument("--routing", default="balanced,skewed", help="layer: balanced and/or skewed")
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--r", type=int, default=64, help="adapter bottleneck")
    ap.add_argument("--d", type=int, default=256, help="model width")
    ap.add_argument("--layers", type=int, default=4, help="train_step: transformer blocks")
    ap.add_argument("--batch", type=int, default=32, help="train_step: sequences per step")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 on GPU, 2 on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="bf16 = autocast, router in fp32 (default on GPU); fp32 (default on CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="layer: also time the masked path under torch.compile (default: on GPU only)")
    ap.add_argument("--paths", default=",".join(PATHS), help="layer: which paths to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    args.n = [int(x) for x in args.n.split(",")]
    args.experts = [int(x) for x in args.experts.split(",")]
    args.routing = args.routing.split(",")
    args.paths = args.paths.split(",")
    for name in args.routing:
        if name not in ("balanced", "skewed"):
            ap.error(f"--routing: unknown routing {name!r}")
    for name in args.paths:
        if name not in PATHS:
            ap.error(f"--paths: unknown path {name!r}, choose from {PATHS}")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.compile = cuda if args.compile is None else args.compile
    args.warmup = (10 if cuda else 2) if args.warmup is None else args.warmup
    return args


def device_setup(args):
    """(device, the autocast context for --dtype, the device's name for the report)."""
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    return device, autocast, (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def timed(fn, device):
    """Wall time of one call in ms: CUDA events on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def interleaved(fns, runs, warmup, device):
    """{name: [ms, ...]}: every function once per round, `runs` rounds after `warmup` untimed ones."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def summary(ms):
    """median and (min, max) of a list of times."""
    return dict(median=statistics.median(ms), low=min(ms), high=max(ms))


def write_json(path, results):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# one MoE layer

def make_layer(d, n_experts, top_k, r, device, seed, ffn="gpt2"):
    """A PESC layer around GPT-2's FFN (tanh GELU), frozen, with non-zero adapters; ffn="none" leaves
    the FFN out (an identity), to time the router and the adapter mixing alone."""
    torch.manual_seed(seed)
    ffn = MLP(GPTConfig(n_embd=d, n_head=1, gelu="tanh")) if ffn == "gpt2" else torch.nn.Identity()
    layer = PESCMoE(ffn, d, n_experts=n_experts, top_k=top_k, adapter_dim=r).to(device)
    with torch.no_grad():
        layer.w_up.normal_(0.0, 0.02)   # zero at init; non-zero as after some training
    return layer


def routings(layer, d, seed, device):
    """Router weights for inputs h = x + mu with x ~ N(0, I) and a shared direction mu (as a residual
    stream has). Balanced: random rows orthogonal to mu. Skewed: the same plus a component along mu
    on experts 0 and 1 that lifts their logits by 2, about 4 standard deviations of the others."""
    g = torch.Generator().manual_seed(seed + 1)
    mu = torch.randn(d, generator=g)
    mu_hat = mu / mu.norm()
    w = 0.02 * torch.randn(layer.n_experts, d, generator=g)
    w -= (w @ mu_hat)[:, None] * mu_hat[None, :]
    skewed = w.clone()
    skewed[:2] += 2.0 / mu.norm() * mu_hat
    return mu.to(device), {"balanced": w.to(device), "skewed": skewed.to(device)}


def usable_paths(args, device):
    paths = [p for p in args.paths if p != "masked-compile" or args.compile]
    if "kernels" in paths and not (device.type == "cuda" and moe.kernels.available()):
        print("kernels path skipped: it needs a GPU and a working build of kernels.cu")
        paths.remove("kernels")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if "grouped" in paths and not moe.grouped_mm_works(device, dtype):
        print(f"grouped path skipped: torch {torch.__version__} has no grouped_mm for {device.type}/{dtype}")
        paths.remove("grouped")
    return paths


def layer_bench(args):
    device, autocast, name = device_setup(args)
    paths = usable_paths(args, device)
    print(f"device {name}, torch {torch.__version__}, dtype {args.dtype}, d={args.d}, r={args.r}, k={args.top_k}, "
          f"FFN {'d -> 4d -> d' if args.ffn == 'gpt2' else 'left out'}, {torch.get_num_threads()} threads, "
          f"median of {args.runs} interleaved rounds after {args.warmup} warm-up")
    rows = []
    for n_experts in args.experts:
        layer = make_layer(args.d, n_experts, args.top_k, args.r, device, args.seed, args.ffn)
        # dynamic=True: one compiled graph for every N (a static one per N would cost a compile each)
        compiled = torch.compile(layer, dynamic=True) if "masked-compile" in paths else None
        mu, router_weights = routings(layer, args.d, args.seed, device)
        for routing in args.routing:
            with torch.no_grad():
                layer.router.gate.weight.copy_(router_weights[routing])   # in place: no recompile
            for N in args.n:
                rows.append(layer_row(layer, compiled, paths, mu, N, n_experts, routing, args, device, autocast))
                print("  " + ", ".join(f"{k}={v}" for k, v in rows[-1].items() if not isinstance(v, dict)) + ": " +
                      ", ".join(f"{p} {rows[-1][p]['fwd']['median']:.2f}/{rows[-1][p]['fwd_bwd']['median']:.2f} ms"
                                for p in paths), flush=True)
                if args.out:   # after every row, so that a run cut short still leaves its numbers
                    write_json(args.out, dict(meta=dict(device=name, torch=torch.__version__, dtype=args.dtype, d=args.d,
                                                        r=args.r, top_k=args.top_k, ffn=args.ffn, runs=args.runs), rows=rows))
    print()
    print(layer_table(rows, paths, device))


def layer_row(layer, compiled, paths, mu, N, n_experts, routing, args, device, autocast):
    g = torch.Generator(device=device).manual_seed(args.seed + N)
    h = (torch.randn(N, args.d, generator=g, device=device) + mu).requires_grad_(True)
    grad_y = torch.randn(N, args.d, generator=g, device=device).to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    fwd, fwd_bwd = {}, {}
    for path in paths:
        def run(path=path, backward=False):
            layer.dispatch = path.removesuffix("-compile")
            module = compiled if path == "masked-compile" else layer
            with autocast:
                y, (aux, _, _) = module(h)
            if backward:
                layer.zero_grad(set_to_none=True)
                h.grad = None
                torch.autograd.backward((y, aux), (grad_y.to(y.dtype), torch.ones_like(aux)))
        fwd[path] = lambda run=run: run(backward=False)
        fwd_bwd[path] = lambda run=run: run(backward=True)
    with torch.no_grad():
        t_fwd = interleaved(fwd, args.runs, args.warmup, device)
    t_fb = interleaved(fwd_bwd, args.runs, args.warmup, device)
    with torch.no_grad():
        _, (_, counts, _) = layer(h)
    row = dict(E=n_experts, routing=routing, N=N, top2_share=round((counts.float().topk(2).values.sum() / counts.sum()).item(), 2))
    for path in paths:
        row[path] = dict(fwd=summary(t_fwd[path]), fwd_bwd=summary(t_fb[path]))
    return row


def ratio(row, slow, fast, key):
    return row[slow][key]["median"] / row[fast][key]["median"]


def layer_table(rows, paths, device):
    """One line per (E, routing, N): each path's forward / forward+backward median, then the ratios."""
    pairs = [(a, b) for a, b in (("loop", "masked"), ("masked", "grouped"), ("masked", "kernels")) if a in paths and b in paths]
    head = ["E", "routing", "N", "top-2 share"] + [f"{p} ms (fwd / f+b)" for p in paths] + \
           [f"{b} vs {a} (fwd / f+b)" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["E"]), row["routing"], str(row["N"]), f"{row['top2_share']:.2f}"]
        cells += [f"{row[p]['fwd']['median']:.2f} / {row[p]['fwd_bwd']['median']:.2f}" for p in paths]
        cells += [f"{ratio(row, a, b, 'fwd'):.2f}x / {ratio(row, a, b, 'fwd_bwd'):.2f}x" for a, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the fused part alone: what kernels.cu replaces

def fused_bench(args):
    """route() + gate_gelu_mask() (the eager PyTorch ops of the masked path between its two matmuls)
    against kernels.route_cuda + kernels.gate_gelu_mask_cuda, forward and forward + backward, with
    gradients flowing into the logits from both the gates and the probabilities (as the aux loss does)."""
    device, _, name = device_setup(args)
    if not (device.type == "cuda" and moe.kernels.available()):
        raise SystemExit("--fused needs a GPU and a working build of kernels.cu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device {name}, torch {torch.__version__}, p in {dtype}, r={args.r}, k={args.top_k}, "
          f"median of {args.runs} interleaved rounds after {args.warmup} warm-up")
    rows = []
    for n_experts in args.experts:
        for N in args.n:
            g = torch.Generator(device=device).manual_seed(args.seed + N)
            logits = torch.randn(N, n_experts, generator=g, device=device).requires_grad_(True)
            p = torch.randn(N, n_experts * args.r, generator=g, device=device).to(dtype).requires_grad_(True)
            grad_a = torch.randn(N, n_experts * args.r, generator=g, device=device).to(dtype)
            grad_probs = torch.randn(N, n_experts, generator=g, device=device)
            ops = {"eager": (moe.route, moe.gate_gelu_mask),
                   "kernels": (moe.kernels.route_cuda, moe.kernels.gate_gelu_mask_cuda)}
            fwd, fwd_bwd = {}, {}
            for path, (route_op, mask_op) in ops.items():
                def run(route_op=route_op, mask_op=mask_op, backward=False):
                    weights, indices, probs, _ = route_op(logits, args.top_k)
                    a = mask_op(p, indices, weights, n_experts, 1.0)
                    if backward:
                        torch.autograd.backward((a, probs), (grad_a, grad_probs))
                fwd[path] = lambda run=run: run(backward=False)
                fwd_bwd[path] = lambda run=run: run(backward=True)
            with torch.no_grad():
                t_fwd = interleaved(fwd, args.runs, args.warmup, device)
            t_fb = interleaved(fwd_bwd, args.runs, args.warmup, device)
            row = dict(E=n_experts, N=N, **{path: dict(fwd=summary(t_fwd[path]), fwd_bwd=summary(t_fb[path]))
                                            for path in ops})
            rows.append(row)
            print(f"  E={n_experts} N={N}: eager {row['eager']['fwd']['median']:.3f}/{row['eager']['fwd_bwd']['median']:.3f} ms, "
                  f"kernels {row['kernels']['fwd']['median']:.3f}/{row['kernels']['fwd_bwd']['median']:.3f} ms: "
                  f"{ratio(row, 'eager', 'kernels', 'fwd'):.2f}x / {ratio(row, 'eager', 'kernels', 'fwd_bwd'):.2f}x",
                  flush=True)
    if args.out:
        write_json(args.out, dict(meta=dict(device=name, torch=torch.__version__, dtype=args.dtype, r=args.r,
                                            top_k=args.top_k, runs=args.runs), rows=rows))


# -----------------------------------------------------------------------------
# whole training steps, interleaved

METHODS = {  # name: (method, n_experts, top_k)
    "adapter": ("adapter", 1, 1), "pesc4": ("pesc", 4, 2), "pesc8": ("pesc", 8, 2), "pesc16": ("pesc", 16, 2),
    "sparse8": ("sparse", 8, 2), "full": ("full", 0, 0),
}
LABELS = {"adapter": "one adapter (PESC E=1, k=1)", "pesc4": "PESC E=4, k=2", "pesc8": "PESC E=8, k=2",
          "pesc16": "PESC E=16, k=2", "sparse8": "sparse upcycling E=8, k=2", "full": "full fine-tune"}


def train_step_models(args, device, vocab_size, block_size):
    from optim import make_optimizer
    from upcycle import upcycle
    models = {}
    for name, (method, E, k) in METHODS.items():
        torch.manual_seed(args.seed)   # the same random base for every method
        model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=args.layers,
                              n_head=max(1, args.d // 64), n_embd=args.d))
        if method == "full":
            model.requires_grad_(True)
        else:
            upcycle(model, method, n_experts=E, top_k=k, adapter_dim=args.r, lora_rank=8, verbose=False)
        model.to(device)
        models[name] = (model, make_optimizer(model, 1e-3, 0.0, device.type))
    return models


def train_step_bench(args):
    from data.instruct import batch_at, encode_dataset, make_instruction_set
    from tokenizer import byte_tokenizer
    device, autocast, device_name = device_setup(args)
    tok = byte_tokenizer()
    data = make_instruction_set(seed=1337, n_train=2000, n_val=30)
    train_enc = encode_dataset(tok, data["train"], 128)
    models = train_step_models(args, device, 320, 128)

    def step(name, batch):
        model, optimizer = models[name]
        idx, targets, mask = batch
        idx, targets = idx.to(device), targets.to(device)   # the mask stays on the host, as in train.py
        with autocast:
            _, ce, routing = model(idx, targets, mask)
        (ce + (routing.aux_loss if routing is not None else 0)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {name: [] for name in models}
    n_tokens = []
    for i in tqdm(range(args.warmup + args.runs), desc="training steps, every model in turn"):
        batch = batch_at(train_enc, i, args.batch, args.seed, tok.pad_id)   # one batch for all
        n_tokens.append(batch[0].numel())
        for name in models:
            ms = timed(lambda: step(name, batch), device)
            if i >= args.warmup:
                times[name].append(ms)
    base = statistics.median(times["adapter"])
    rows = {name: dict(step_ms=statistics.median(ts), low_ms=min(ts), high_ms=max(ts),
                       vs_adapter=statistics.median(ts) / base,
                       # the ratio per round, so its spread is that of one interleaved comparison
                       vs_adapter_per_round=summary([t / a for t, a in zip(ts, times["adapter"])]))
            for name, ts in times.items()}
    print(f"\ndevice {device_name}, torch {torch.__version__}, dtype {args.dtype}, {torch.get_num_threads()} threads; "
          f"d={args.d}, r={args.r} (r/d = 1/{args.d / args.r:g}), {args.layers} layers, batch {args.batch} x "
          f"~{statistics.mean(n_tokens) / args.batch:.0f} tokens; median of {args.runs} rounds after {args.warmup} warm-up")
    print("| method | step ms (median, range) | vs one adapter (median; per-round range) |\n|---|---|---|")
    for name, row in rows.items():
        pr = row["vs_adapter_per_round"]
        print(f"| {LABELS[name]} | {row['step_ms']:.1f} ({row['low_ms']:.1f}-{row['high_ms']:.1f}) | "
              f"{row['vs_adapter']:.2f}x ({pr['low']:.2f}-{pr['high']:.2f}) |")
    quarter = abs(args.r / args.d - 0.25) < 1e-9
    target8 = TARGETS["train_step_quarter"] if quarter else TARGETS["train_step_twelfth"] if abs(args.d / args.r - 12) < 1e-9 else None
    for name, target in (("pesc8", target8), ("pesc16", TARGETS["train_step_e16"] if quarter else None)):
        verdict = "" if target is None else f" (target <= {target}: {'met' if rows[name]['vs_adapter'] <= target else 'MISSED'})"
        print(f"{LABELS[name].split(',')[0]} vs one adapter: {rows[name]['vs_adapter']:.2f}x{verdict}")
    if args.out:
        write_json(args.out, dict(meta=dict(device=device_name, torch=torch.__version__, dtype=args.dtype, d=args.d,
                                            r=args.r, layers=args.layers, batch=args.batch, runs=args.runs,
                                            warmup=args.warmup, threads=torch.get_num_threads()), rows=rows))
        print(f"wrote {args.out}")


# -----------------------------------------------------------------------------
# memory of the QLoRA recipe: each setting in its own process, steps interleaved

MEMORY_SETTINGS = {"fp32 base": (False, False), "fp32 base + checkpointing": (False, True),
                   "4-bit base": (True, False), "4-bit base + checkpointing": (True, True)}


def memory_worker(quantize, checkpointing, batch, seq, pipe):
    """Builds a GPT-2-124M-shaped PESC model (E=8, k=2, r=64, LoRA r=8 on every linear layer) and runs
    one training step per message; answers with the step time; at the end, the peak RSS of the steps."""
    import gc
    from optim import make_optimizer
    from upcycle import upcycle
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=seq, gelu="tanh"))
    upcycle(model, "pesc", n_experts=8, top_k=2, adapter_dim=64, lora_rank=8, lora_targets="all",
            quantize_base=quantize, verbose=False)
    model.gradient_checkpointing = checkpointing
    optimizer = make_optimizer(model, 1e-4, 0.0, "cpu")
    idx = torch.randint(50257, (batch, seq), generator=torch.Generator().manual_seed(1))
    # the peak from here on: building the model (the fp32 weights exist until they are quantized)
    # is not the training step's memory. Linux resets the high-water mark on "5" to clear_refs.
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    while pipe.recv() == "step":
        t0 = time.perf_counter()
        _, ce, routing = model(idx, idx)
        (ce + routing.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pipe.send(time.perf_counter() - t0)
    with open("/proc/self/status") as f:   # VmHWM: the peak resident set size since the reset
        pipe.send(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")))


def memory_bench(args):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    batch, seq = 4, 128
    workers = {}
    for name, (quantize, checkpointing) in MEMORY_SETTINGS.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=memory_worker, args=(quantize, checkpointing, batch, seq, child))
        proc.start()
        workers[name] = (proc, parent)
    times = {name: [] for name in workers}
    for i in tqdm(range(args.warmup + args.runs), desc="training steps, every setting in turn"):
        for name, (_, pipe) in workers.items():
            pipe.send("step")
            seconds = pipe.recv()
            if i >= args.warmup:
                times[name].append(seconds)
    peak = {}
    for name, (proc, pipe) in workers.items():
        pipe.send("stop")
        peak[name] = pipe.recv()
        proc.join()
    base = statistics.median(times["fp32 base"])
    print(f"\nGPT-2-124M-shaped PESC (E=8, k=2, r=64, LoRA r=8 on every linear layer), batch {batch} x {seq} tokens, "
          f"CPU fp32 compute, one process per setting, {os.environ.get('BENCH_THREADS', '1')} thread(s) each; "
          f"median of {args.runs} interleaved steps after {args.warmup} warm-up")
    print("| setting | peak RSS of the steps | step s (median, range) | step time vs fp32 base |\n|---|---|---|---|")
    rows = {}
    for name, ts in times.items():
        rows[name] = dict(peak_rss_bytes=peak[name], step_s=summary(ts), vs_fp32=statistics.median(ts) / base)
        print(f"| {name} | {peak[name] / 2**20:.0f} MiB | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) | "
              f"{rows[name]['vs_fp32']:.2f}x |")
    if args.out:
        write_json(args.out, dict(meta=dict(batch=batch, seq=seq, runs=args.runs, warmup=args.warmup), rows=rows))


# -----------------------------------------------------------------------------
# exact-match evaluation: batched with the KV cache, against the ways it was done before

@torch.no_grad()
def answers_by_length(model, tok, examples, max_new_tokens, device, ctx, use_cache):
    """The earlier evaluation, kept here as the baseline: only prompts of equal token length are
    decoded together (no padding), 64 at a time; without the cache, the evaluation before the KV cache."""
    from data.instruct import decode_response, prompt_ids
    prompts = [prompt_ids(tok, ex) for ex in examples]
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    answers = [None] * len(examples)
    for length, rows in sorted(by_length.items()):
        for s in range(0, len(rows), 64):
            chunk = rows[s:s + 64]
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            with ctx:
                out = model.generate(idx, max_new_tokens, temperature=0, eos_id=tok.eos_id, n_vocab=tok.n_vocab,
                                     use_cache=use_cache)
            for row, i in zip(out[:, length:].tolist(), chunk):
                answers[i] = decode_response(tok, row)
    return answers


def eval_bench(args):
    """Greedy answers to the held-out prompts of a checkpoint's run, as train.py's two exact-match
    evaluations produce them -- before tuning (the upcycled base, which computes the base's function
    and, never having learned to stop, writes every token it may) and after (the checkpoint) -- three
    ways, in turn: evaluate.greedy_answers (prompts of different lengths in padded batches, with
    the KV cache), prompts of equal length only with the cache, and the same without the cache (the
    whole prefix again for every token: the evaluation before the KV cache). The answers must be identical."""
    from checkpoint import build_model, load_base, read_checkpoint
    from data.instruct import make_instruction_set
    from evaluate import greedy_answers
    from tokenizer import load_tokenizer
    from upcycle import upcycle
    device, autocast, device_name = device_setup(args)
    ckpt = read_checkpoint(args.ckpt)
    tuned = build_model(ckpt, args.ckpt).to(device).eval()
    before = upcycle(load_base(ckpt["base"], args.ckpt, ckpt["model_args"]["dropout"]), **ckpt["upcycle_args"],
                     verbose=False)   # the base as the checkpoint names it (checked by sha256), upcycled afresh
    tok = load_tokenizer(ckpt["tokenizer"])
    cfg = ckpt["config"]
    examples = make_instruction_set(seed=cfg["data_seed"], n_train=cfg["n_train"], n_val=cfg["n_val"])["val"]
    n_new = cfg["eval_max_new_tokens"]
    models = {"before tuning": before.to(device).eval(), "after tuning": tuned}
    ways = {"padded, cache": lambda m: greedy_answers(m, tok, examples, n_new, device, autocast),
            "equal lengths, cache": lambda m: answers_by_length(m, tok, examples, n_new, device, autocast, True),
            "equal lengths, no cache": lambda m: answers_by_length(m, tok, examples, n_new, device, autocast, False)}
    times = {(name, way): [] for name in models for way in ways}
    answers = {}
    for _ in range(args.runs):
        for name, model in models.items():
            for way, answer in ways.items():
                t0 = time.perf_counter()
                answers[name, way] = answer(model)
                times[name, way].append(time.perf_counter() - t0)
    same = all(answers[name, way] == answers[name, "padded, cache"] for name in models for way in ways)
    print(f"\n{args.ckpt}: {len(examples)} held-out prompts, {n_new} new tokens at most, {device_name}, "
          f"{torch.get_num_threads()} threads, median (min-max) of {args.runs} interleaved runs, seconds")
    print("| evaluation | " + " | ".join(ways) + " |")
    print("|---|" + "---|" * len(ways))
    for name in list(models) + ["both"]:
        names = list(models) if name == "both" else [name]
        medians = {way: sum(statistics.median(times[n, way]) for n in names) for way in ways}
        cells = []
        for way in ways:
            spread = "" if name == "both" else \
                f" ({min(times[name, way]):.2f}-{max(times[name, way]):.2f})"
            cells.append(f"{medians[way]:.2f}{spread}, {medians[way] / medians['padded, cache']:.1f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"answers identical in all three: {same}")
    if args.out:
        write_json(args.out, dict(times={f"{n}: {w}": t for (n, w), t in times.items()}, identical=same))
    if not same:
        raise SystemExit("the answers differ between the three ways")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.train_step:
        train_step_bench(arguments)
    elif arguments.memory:
        memory_bench(arguments)
    elif arguments.eval:
        eval_bench(arguments)
    elif arguments.fused:
        fused_bench(arguments)
    else:
        layer_bench(arguments)
