"""
Benchmark of one PESC MoE layer (moe.PESCMoE around GPT-2's FFN, d = 768, r = 64, k = 2): forward and
forward+backward of each way to run it, over token counts N, expert counts E and two routings.

  loop            dispatch="loop": gather / run / index_add per expert (Mixtral style, the official code)
  dense           dispatch="dense" in PyTorch ops, eager (moe.USE_KERNELS = False)
  dense-compile   the same under torch.compile (--compile; on by default on a GPU)
  kernel          dispatch="dense" with the fused router and gate-GELU-mask kernels of kernels.cu (GPU)

CPU, a few minutes:
    python bench.py --n 128,512,2048 --runs 10 --out out/bench_cpu.json
GPU (H100/H200; builds kernels.cu first if needed):
    python bench.py --out out/bench_gpu.json

--train_step times whole training steps instead (forward, backward, gradient clipping, AdamW) of every
model in the comparison (config/compare/common.py + config/compare/<method>.py, random base weights,
real batches of the embedded instruction set), one step of each in turn so that a busy moment of the
machine slows all of them alike, and reports each as a ratio to the one-adapter baseline:
    python bench.py --train_step --runs 30

As in training: the FFN is frozen but in the layer (it is part of the cost), only the adapters and the
router get gradients, the input requires grad (earlier layers train LoRA), bf16 autocast on the GPU
with the router in fp32 (--dtype). "balanced" spreads the tokens over the experts; "skewed" biases the
router so that most assignments go to experts 0 and 1 (the table shows the share the top 2 get).
Each time is the median of --runs calls after --warmup untimed ones: CUDA events on the GPU,
time.perf_counter on the CPU. Memory: the peak of one forward+backward above what was allocated
before it (torch.cuda.max_memory_allocated); n/a on the CPU.
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
from model import MLP, GPTConfig
from moe import PESCMoE

PATHS = ("loop", "dense", "dense-compile", "kernel")
# the targets of the kernel work (PESC.md, "Cost model and dispatch"), checked on the GPU only
KERNEL_TARGET_SMALL_N, KERNEL_TARGET_SPEEDUP = 2048, 1.5   # kernel >= 1.5x dense at N <= 2048, >= 1x at any N
DENSE_TARGET_SPEEDUP = 3.0                                 # dense >= 3x loop at every N


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", default="128,512,2048,8192,32768", help="token counts, comma-separated")
    ap.add_argument("--experts", default="8,16", help="expert counts E, comma-separated")
    ap.add_argument("--routing", default="balanced,skewed", help="balanced and/or skewed")
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--r", type=int, default=64, help="adapter bottleneck")
    ap.add_argument("--d", type=int, default=768, help="model width")
    ap.add_argument("--runs", type=int, default=50, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 on GPU, 2 on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="bf16 = autocast, router in fp32 (default on GPU); fp32 (default on CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the dense path under torch.compile (default: on GPU only)")
    ap.add_argument("--paths", default=",".join(PATHS), help="which paths to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    ap.add_argument("--train_step", action="store_true",
                    help="time training steps of the comparison's models instead (see above)")
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
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    args.warmup = (10 if args.device.startswith("cuda") else 2) if args.warmup is None else args.warmup
    return args


def median_ms(fn, runs, warmup, device):
    """Median wall time of fn() in milliseconds; on a GPU measured with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_mib(fn, device):
    """Peak memory of one call above what was allocated before it, in MiB (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_layer(d, n_experts, top_k, r, device, seed):
    """A PESC layer around GPT-2's FFN (tanh GELU), frozen, with nonzero adapters."""
    torch.manual_seed(seed)
    ffn = MLP(GPTConfig(n_embd=d, n_head=12 if d % 12 == 0 else 1, gelu="tanh"))
    layer = PESCMoE(ffn, d, n_experts=n_experts, top_k=top_k, adapter_dim=r).to(device)
    with torch.no_grad():
        for expert in layer.experts:
            expert.up.weight.normal_(0.0, 0.02)   # zero at init; nonzero as after some training
    return layer


def routings(layer, d, seed, device):
    """Router weights for each routing, for inputs h = x + mu with x ~ N(0, I) and a shared direction
    mu (as a residual stream has). Balanced: random rows orthogonal to mu, so mu moves no logit.
    Skewed: the same plus a component along mu on experts 0 and 1 that lifts their logits by 2, about
    4 standard deviations of the others."""
    g = torch.Generator().manual_seed(seed + 1)
    mu = torch.randn(d, generator=g)
    mu_hat = mu / mu.norm()
    w = 0.02 * torch.randn(layer.n_experts, d, generator=g)
    w -= (w @ mu_hat)[:, None] * mu_hat[None, :]
    skewed = w.clone()
    skewed[:2] += 2.0 / mu.norm() * mu_hat
    return mu.to(device), {"balanced": w.to(device), "skewed": skewed.to(device)}


def device_setup(args):
    """(device, the autocast context for --dtype, the device's name for the report)."""
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    return device, autocast, (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def main():
    args = parse_args()
    if args.train_step:
        return train_step_bench(args)
    device, autocast, name = device_setup(args)
    paths = [p for p in args.paths if p != "dense-compile" or args.compile]
    if "kernel" in paths and not (device.type == "cuda" and moe.kernels_available()):
        print("kernel path skipped: it needs a GPU and a built kernels.cu")
        paths.remove("kernel")
    print(f"device {name}, torch {torch.__version__}, dtype {args.dtype}, d={args.d}, r={args.r}, "
          f"k={args.top_k}, median of {args.runs} runs after {args.warmup} warm-up, paths: {', '.join(paths)}")

    meta = dict(device=name, torch=torch.__version__, dtype=args.dtype, d=args.d, r=args.r, top_k=args.top_k,
                runs=args.runs, warmup=args.warmup, paths=paths)
    rows = []
    for n_experts in args.experts:
        layer = make_layer(args.d, n_experts, args.top_k, args.r, device, args.seed)
        # dynamic=True: one compiled graph for every N (a static one per N would cost a compile each)
        compiled = torch.compile(layer, dynamic=True) if "dense-compile" in paths else None
        mu, router_weights = routings(layer, args.d, args.seed, device)
        for routing in args.routing:
            with torch.no_grad():
                layer.router.gate.weight.copy_(router_weights[routing])   # in place: no recompile
            for N in args.n:
                g = torch.Generator(device=device).manual_seed(args.seed + N)
                h = (torch.randn(N, args.d, generator=g, device=device) + mu).requires_grad_(True)
                grad_y = torch.randn(N, args.d, generator=g, device=device)   # dL/dy
                grad_y = grad_y.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)   # y's dtype
                row = dict(E=n_experts, routing=routing, N=N)
                for path in paths:
                    module = compiled if path == "dense-compile" else layer
                    layer.dispatch = "loop" if path == "loop" else "dense"
                    moe.USE_KERNELS = path == "kernel"

                    def forward():
                        with autocast:
                            return module(h)

                    def forward_backward():
                        layer.zero_grad(set_to_none=True)
                        h.grad = None
                        y, aux = forward()
                        torch.autograd.backward((y, aux), (grad_y.to(y.dtype), torch.ones_like(aux)))

                    row[path] = dict(fwd_ms=median_ms(forward, args.runs, args.warmup, device),
                                     fwd_bwd_ms=median_ms(forward_backward, args.runs, args.warmup, device),
                                     peak_mib=peak_mib(forward_backward, device))
                counts = layer.last_counts.float()
                row["top2_share"] = (counts.topk(2).values.sum() / counts.sum()).item()
                rows.append(row)
                if args.out:   # after every row, so that a run cut short still leaves its numbers
                    write_json(args.out, dict(meta=meta, rows=rows))
                print(f"  E={n_experts} {routing} N={N}: " + ", ".join(
                    f"{p} {row[p]['fwd_ms']:.3f}/{row[p]['fwd_bwd_ms']:.3f} ms" for p in paths), flush=True)
        moe.USE_KERNELS = True

    print()
    print(markdown(rows, paths, device))
    if args.out:
        print(f"\nwrote {args.out}")


# -----------------------------------------------------------------------------
# whole training steps of the comparison's models, interleaved

def train_step_bench(args):
    from compare import LABELS, RUNS, STEP_TARGET
    from data.instruct import encode_dataset, make_instruction_set
    from data.pydocs import BYTE_VOCAB_SIZE, byte_tokenizer
    from model import GPT
    from train import DEFAULTS, apply_method, make_optimizer, parse_config, tune_batch

    device, autocast, device_name = device_setup(args)
    configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "compare")
    cfgs = {name: parse_config([os.path.join(configs, "common.py"), os.path.join(configs, f"{name}.py")], DEFAULTS)
            for name in RUNS}
    cfg = cfgs["adapter"]
    enc = byte_tokenizer()
    data = make_instruction_set(seed=cfg["data_seed"], n_train=cfg["n_train"], n_val=cfg["n_val"])
    train_enc = encode_dataset(enc, data["train"], cfg["block_size"], enc.eot_token)
    models = {}
    for name, c in cfgs.items():
        torch.manual_seed(args.seed)   # the same random base for every method
        model = GPT(GPTConfig(block_size=c["block_size"], vocab_size=BYTE_VOCAB_SIZE, n_layer=c["n_layer"],
                              n_head=c["n_head"], n_embd=c["n_embd"], bias=c["bias"])).requires_grad_(False)
        model = apply_method(model, c, verbose=False).to(device)
        models[name] = (model, make_optimizer(model, c["learning_rate"], c["weight_decay"], device.type))

    def step(name, batch):
        model, optimizer = models[name]
        idx, targets, mask = (t.to(device) for t in batch)
        with autocast:
            _, loss = model(idx, targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in models}
    n_tokens = []
    for i in tqdm(range(args.warmup + args.runs), desc="training steps, every model in turn"):
        batch = tune_batch(train_enc, i, cfg["batch_size"], args.seed, enc.eot_token)   # one batch for all
        n_tokens.append(batch[0].numel())
        for name in models:
            t0 = time.perf_counter()
            step(name, batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["adapter"])
    rows = {name: dict(step_ms=1e3 * statistics.median(ts), vs_adapter=statistics.median(ts) / base)
            for name, ts in times.items()}
    print(f"\ndevice {device_name}, torch {torch.__version__}, dtype {args.dtype}, {torch.get_num_threads()} threads; "
          f"median of {args.runs} steps after {args.warmup} warm-up, batch {cfg['batch_size']} x "
          f"~{statistics.mean(n_tokens) / cfg['batch_size']:.0f} tokens, adapters r = {cfg['adapter_dim']}")
    print("| method | step ms | vs adapter |\n|---|---|---|")
    for run, row in rows.items():
        print(f"| {LABELS[run]} | {row['step_ms']:.1f} | {row['vs_adapter']:.2f}x |")
    ratio = rows["pesc8"]["vs_adapter"]
    print(f"\ntarget: PESC E=8 step / adapter baseline = {ratio:.2f} (<= {STEP_TARGET}): "
          + ("met" if ratio <= STEP_TARGET else "MISSED"))
    if args.out:
        write_json(args.out, dict(meta=dict(device=device_name, torch=torch.__version__, dtype=args.dtype, runs=args.runs,
                                            warmup=args.warmup, threads=torch.get_num_threads()), rows=rows))
        print(f"wrote {args.out}")


def write_json(path, results):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def speedup(row, slow, fast, key):
    return row[slow][key] / row[fast][key]


def markdown(rows, paths, device):
    """One line per (E, routing, N): each path's forward / forward+backward time, then the two ratios
    (forward and forward+backward) and, on the GPU, whether they meet the targets."""
    gpu = device.type == "cuda"
    head = ["E", "routing", "N", "top-2 share"] + [f"{p} ms (fwd / f+b)" for p in paths]
    if "loop" in paths and "dense" in paths:
        head.append("dense vs loop" + (f" (target >= {DENSE_TARGET_SPEEDUP:g}x)" if gpu else ""))
    if "kernel" in paths:
        head.append(f"kernel vs dense (target >= {KERNEL_TARGET_SPEEDUP:g}x at N <= {KERNEL_TARGET_SMALL_N}, "
                    f">= 1x above)")
    if gpu:
        head += [f"{p} peak MiB (f+b)" for p in paths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["E"]), row["routing"], str(row["N"]), f"{row['top2_share']:.2f}"]
        cells += [f"{row[p]['fwd_ms']:.3f} / {row[p]['fwd_bwd_ms']:.3f}" for p in paths]
        if "loop" in paths and "dense" in paths:
            cells.append(ratio_cell(row, "loop", "dense", DENSE_TARGET_SPEEDUP if gpu else None))
        if "kernel" in paths:
            target = KERNEL_TARGET_SPEEDUP if row["N"] <= KERNEL_TARGET_SMALL_N else 1.0
            cells.append(ratio_cell(row, "dense", "kernel", target))
        if gpu:
            cells += [f"{row[p]['peak_mib']:.1f}" for p in paths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_cell(row, slow, fast, target):
    """'2.10x / 1.85x': how many times faster `fast` is than `slow`, forward / forward+backward;
    with a target, 'met' or 'MISSED' for both numbers."""
    fwd, fb = speedup(row, slow, fast, "fwd_ms"), speedup(row, slow, fast, "fwd_bwd_ms")
    cell = f"{fwd:.2f}x / {fb:.2f}x"
    if target is not None:
        cell += " met" if min(fwd, fb) >= target else " MISSED"
    return cell


if __name__ == "__main__":
    main()
