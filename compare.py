"""
The paper's comparison in miniature: a full fine-tune, the paper's two baselines without experts (one
adapter per FFN; "Camel", LoRA on every linear layer), a one-adapter baseline with as many trainable
parameters as PESC E=8, sparse upcycling, PESC with 4, 8 and 16 experts, and PESC E=8 on a 4-bit
base -- from the same pretrained base, on the embedded instruction set, with the same steps, data
order and learning-rate schedule, for several seeds.

    python compare.py                      # every run (config/compare/*.py x seeds), then the report
    python compare.py --report             # only rebuild the report from finished runs
    python compare.py --sizes              # parameter, memory and NF4-error tables (no training)

Each run is `python train.py config/compare/common.py config/compare/<name>.py --seed=S` in its own
process (so that its peak memory is its own); its checkpoints and summary land in
out-compare/<name>-s<S>/ (git-ignored). The report goes to results/ (in git): compare.json,
compare.md and two PNG figures (matplotlib, optional: it says how to install it when missing).
Differences between methods are reported per seed, paired against the one-adapter baseline run with
the same seed (same data order, same base): at this size a single seed's ordering is noise.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from data.instruct import FAMILIES
from evaluate import read_log

ROOT = os.path.dirname(os.path.abspath(__file__))
RUNS = ["full", "adapter", "adapter_wide", "lora", "sparse8", "pesc4", "pesc8", "pesc16", "pesc8_nf4"]
LABELS = {"full": "full fine-tune", "adapter": "one adapter (PESC E=1, k=1)",
          "adapter_wide": "one adapter, r=132 (= PESC E=8's trainable params)", "lora": "LoRA on every linear (Camel)",
          "sparse8": "sparse upcycling E=8, k=2", "pesc4": "PESC E=4, k=2", "pesc8": "PESC E=8, k=2",
          "pesc16": "PESC E=16, k=2", "pesc8_nf4": "PESC E=8, k=2, 4-bit NF4 base"}
BASELINE = "adapter"


def run_all(out, seeds):
    base = os.path.join(out, "base.pt")
    todo = [(name, seed) for seed in seeds for name in RUNS]
    t0 = time.time()
    for i, (name, seed) in enumerate(todo):
        run_dir = os.path.join(out, f"{name}-s{seed}")
        if os.path.isfile(os.path.join(run_dir, "result.json")):
            print(f"[{i + 1}/{len(todo)}] {name} seed {seed}: done already")
            continue
        print(f"[{i + 1}/{len(todo)}] {name} seed {seed} ({time.time() - t0:.0f} s so far)", flush=True)
        cmd = [sys.executable, "train.py", "config/compare/common.py", f"config/compare/{name}.py", f"--seed={seed}",
               f"--out_dir={run_dir}", f"--base_ckpt={base}"]
        with open(os.path.join(out, f"{name}-s{seed}.log"), "w") as log:
            r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed; see {log.name}")
    print(f"all runs finished in {time.time() - t0:.0f} s")


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values, scale=100.0, digits=1):
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def load_results(out):
    results = {}
    for path in sorted(glob.glob(os.path.join(out, "*-s*", "result.json"))):
        name = os.path.basename(os.path.dirname(path)).rsplit("-s", 1)[0]
        with open(path) as f:
            result = json.load(f)
        results.setdefault(name, {})[result["seed"]] = result
    return results


def paired(results, name, key):
    """Per seed: method minus the one-adapter baseline with the same seed (same data order)."""
    seeds = sorted(set(results[name]) & set(results[BASELINE]))
    return [key(results[name][s]) - key(results[BASELINE][s]) for s in seeds]


def report(out, dest):
    results = load_results(out)
    if BASELINE not in results:
        sys.exit(f"no finished runs of the one-adapter baseline under {out}; run python compare.py first")
    names = [n for n in RUNS if n in results]
    base_step = statistics.median(r["step_time_s"] for r in results[BASELINE].values())
    head = ("| method | " + " | ".join(f"{f} EM %" for f in FAMILIES) + " | average EM % | held-out loss | "
            "total params | trainable | active / token | checkpoint | step time vs adapter | peak RSS |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    diff_rows = ["| method | EM % minus one adapter, per seed | mean ± std | held-out loss minus one adapter, per seed | "
                 "mean ± std |", "|---|---|---|---|---|"]
    summary = {}
    for name in names:
        rs = list(results[name].values())
        c = rs[0]["counts"]
        step = statistics.median(r["step_time_s"] for r in rs)
        em_diff = paired(results, name, lambda r: 100 * r["after"]["average"])
        loss_diff = paired(results, name, lambda r: r["val_loss"])
        summary[name] = dict(seeds=sorted(results[name]), counts=c, checkpoint_bytes=rs[0]["checkpoint_bytes"],
                             exact_match={f: mean_std([r["after"][f] for r in rs]) for f in FAMILIES + ("average",)},
                             val_loss=mean_std([r["val_loss"] for r in rs]), step_time_s=step,
                             step_time_vs_adapter=step / base_step, peak_memory_bytes=max(r["peak_memory_bytes"] for r in rs),
                             em_minus_adapter=em_diff, loss_minus_adapter=loss_diff)
        rows.append(f"| {LABELS[name]} | " + " | ".join(pm([r["after"][f] for r in rs]) for f in FAMILIES)
                    + f" | {pm([r['after']['average'] for r in rs])} | {pm([r['val_loss'] for r in rs], 1, 3)} | "
                    f"{c['total'] / 1e6:.2f}M | {c['trainable'] / 1e6:.3f}M | {c['active'] / 1e6:.2f}M | "
                    f"{rs[0]['checkpoint_bytes'] / 2**20:.1f} MiB | {step / base_step:.2f}x | "
                    f"{summary[name]['peak_memory_bytes'] / 2**20:.0f} MiB |")
        if name != BASELINE:
            diff_rows.append(f"| {LABELS[name]} | {', '.join(f'{d:+.1f}' for d in em_diff)} | {pm(em_diff, 1.0)} | "
                             f"{', '.join(f'{d:+.3f}' for d in loss_diff)} | {pm(loss_diff, 1.0, 3)} |")
    seeds = sorted({s for v in summary.values() for s in v["seeds"]})
    before = {name: 100 * statistics.mean(r["before"]["exact_match"]["average"] for r in results[name].values())
              for name in names}
    before_text = ", ".join(f"{LABELS[n]} {v:.1f} %" for n, v in before.items()) \
        if len(set(before.values())) > 1 else f"every method {next(iter(before.values())):.1f} %"
    table = "\n".join(rows) + (f"\n\nExact match (EM) on the held-out split, mean ± std over seeds {seeds}; before "
                               f"tuning: {before_text}.\n\nPaired differences against the one-adapter baseline run "
                               f"with the same seed (seeds {seeds}):\n\n" + "\n".join(diff_rows))
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "compare.json"), "w") as f:
        json.dump(dict(summary=summary, runs={n: list(r.values()) for n, r in results.items()}), f, indent=1)
    with open(os.path.join(dest, "compare.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if "pesc8" in summary and "sparse8" in summary:
        p, s = summary["pesc8"], summary["sparse8"]
        print(f"\nPESC E=8 / sparse upcycling: trainable {p['counts']['trainable'] / s['counts']['trainable']:.3f}, "
              f"checkpoint {p['checkpoint_bytes'] / s['checkpoint_bytes']:.3f}; PESC E=8 step time / one adapter "
              f"{p['step_time_vs_adapter']:.2f}")
    figures(out, dest, names, seeds)


def figures(out, dest, names, seeds):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the figures need matplotlib (optional): pip install matplotlib, then python compare.py --report")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))   # validation loss against step, mean over seeds
    for name in names:
        curves = [[(r["step"], r["val_loss"]) for r in read_log(os.path.join(out, f"{name}-s{seed}"))]
                  for seed in seeds if os.path.isfile(os.path.join(out, f"{name}-s{seed}", "result.json"))]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps[1:], mean[1:], marker="o", ms=3, label=LABELS[name])
    ax.set_xlabel("tuning step")
    ax.set_ylabel("held-out response loss (nats / token)")
    ax.set_title(f"Validation loss, mean over seeds {seeds}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(dest, "val_loss.png"), dpi=120)
    usage = expert_usage(os.path.join(out, f"pesc8-s{seeds[0]}", "ckpt.pt"))
    if usage is not None:   # the paper's routing analysis: expert usage per task family per layer
        n_layers = usage.size(0)
        fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 2.8), squeeze=False)
        for layer in range(n_layers):
            ax = axes[0, layer]
            im = ax.imshow(usage[layer].numpy(), vmin=0, vmax=float(usage.max()), cmap="viridis")
            ax.set_title(f"layer {layer}")
            ax.set_xticks(range(usage.size(2)))
            ax.set_yticks(range(len(FAMILIES)))
            ax.set_yticklabels(FAMILIES if layer == 0 else [])
            ax.set_xlabel("expert")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8,
                     label=f"share of the family's assignments (uniform: 1/{usage.size(2)})")
        fig.suptitle(f"PESC E=8: expert usage per task family on the held-out split (seed {seeds[0]})")
        fig.savefig(os.path.join(dest, "expert_usage.png"), dpi=120, bbox_inches="tight")
        with open(os.path.join(dest, "expert_usage.json"), "w") as f:
            json.dump(dict(families=FAMILIES, shares=usage.tolist()), f)
    print(f"figures: {dest}/val_loss.png, {dest}/expert_usage.png")


@torch.no_grad()
def expert_usage(ckpt_path):
    """(layers, families, E): the share of each family's (token, slot) assignments per expert,
    over every real token of the held-out prompts and responses."""
    if not os.path.isfile(ckpt_path):
        return None
    from checkpoint import build_model, read_checkpoint
    from data.instruct import encode_dataset, make_instruction_set
    from evaluate import response_loss
    from tokenizer import load_tokenizer
    ckpt = read_checkpoint(ckpt_path)
    model = build_model(ckpt, ckpt_path)
    tok = load_tokenizer(ckpt["tokenizer"])
    cfg = ckpt["config"]
    val = make_instruction_set(seed=cfg["data_seed"], n_train=cfg["n_train"], n_val=cfg["n_val"])["val"]
    per_family = []
    for fam in FAMILIES:
        encoded = encode_dataset(tok, [ex for ex in val if ex["family"] == fam], model.config.block_size)
        _, counts = response_loss(model, encoded, 64, tok.pad_id, "cpu", nullcontext())  # (layers, E)
        per_family.append(counts / counts.sum(dim=1, keepdim=True))
    return torch.stack(per_family, dim=1)  # (layers, families, E)


# -----------------------------------------------------------------------------
# --sizes: what the methods cost at real sizes, counted on the meta device (no memory, no download)

SHAPES = {  # name: GPTConfig arguments (the Llama-family rows from their config.json)
    "GPT-2 124M": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, gelu="tanh"),
    "SmolLM2-135M": dict(family="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_dim=1536, vocab_size=49152,
                         bias=False, rope_theta=100000.0, block_size=8192),
    "SmolLM2-360M": dict(family="llama", n_layer=32, n_head=15, n_kv_head=5, n_embd=960, ffn_dim=2560, vocab_size=49152,
                         bias=False, rope_theta=100000.0, block_size=8192),
    "Qwen2.5-0.5B": dict(family="llama", n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_dim=4864, vocab_size=151936,
                         bias=False, qkv_bias=True, rope_theta=1e6, block_size=32768),
    "Llama-3.2-1B": dict(family="llama", n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_dim=8192, vocab_size=128256,
                         bias=False, rope_theta=500000.0, block_size=131072),
    "Llama-2-7B shape": dict(family="llama", n_layer=32, n_head=32, n_embd=4096, ffn_dim=11008, vocab_size=32000,
                             bias=False, tie_embeddings=False, block_size=4096),
}


def meta_model(shape, method, **kwargs):
    from model import GPT, GPTConfig
    from upcycle import upcycle
    with torch.device("meta"):
        model = GPT(GPTConfig(**shape))
        if method != "full":
            upcycle(model, method, verbose=False, **kwargs)
    return model


def sizes():
    from upcycle import count_params
    print("Parameters, E = 8, k = 2, r = 64 (PESC), every layer, no LoRA; AdamW state = two fp32 moments of the "
          "trainable parameters\n")
    print("| model | method | total | trainable | active / token | AdamW state |\n|---|---|---|---|---|---|")
    for name in ("GPT-2 124M", "SmolLM2-135M", "Qwen2.5-0.5B", "Llama-3.2-1B"):
        for method in ("full", "pesc", "sparse"):
            c = count_params(meta_model(SHAPES[name], method, n_experts=8, top_k=2, adapter_dim=64))
            trainable = c["trainable"]   # a full fine-tune: every parameter (a fresh model trains all)
            label = {"full": "full fine-tune", "pesc": "PESC E=8, r=64", "sparse": "sparse upcycling E=8"}[method]
            print(f"| {name} | {label} | {c['total'] / 1e6:.1f}M | {trainable / 1e6:.2f}M | {c['active'] / 1e6:.1f}M | "
                  f"{8 * trainable / 2**30:.2f} GiB |")
    memory_table()
    nf4_error_table()


def frozen_linear_params(model):
    """Weights of the attention and FFN projections: what quantize_base stores in 4 bits."""
    return sum(p.numel() for block in model.transformer.h for owner in (block.attn, block.mlp.ffn)
               for name, p in owner.named_parameters() if name.endswith("weight") and p.dim() == 2)


def memory_table(tokens=16 * 512):
    from costs import activation_bytes_per_token, training_memory
    from quant import nf4_bytes
    from upcycle import count_params
    print(f"\nFrozen base weights and a PESC E=8 (r=64, LoRA r=64 on every linear layer) training step at batch 16 x 512 "
          f"= {tokens} tokens: weights + trainable fp32 weights, grads and AdamW moments + activations (an estimate "
          f"from activation_bytes_per_token, not a measurement)\n")
    print("| model | base fp32 | base bf16 | base NF4 (double quant) | step, bf16 base | step, NF4 base | "
          "step, NF4 base + checkpointing |\n|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        model = meta_model(shape, "pesc", n_experts=8, top_k=2, adapter_dim=64, lora_rank=64, lora_targets="all")
        c = count_params(model)
        frozen = c["total"] - c["trainable"]
        projections = frozen_linear_params(model)
        fp32, bf16 = 4 * frozen, 2 * frozen
        nf4 = 2 * (frozen - projections) + nf4_bytes(projections)   # embeddings, head and norms stay bf16
        steps = [training_memory(base, c["trainable"], activation_bytes_per_token(model.config, ckpt, 8 * 64), tokens)
                 for base, ckpt in ((bf16, False), (nf4, False), (nf4, True))]
        print(f"| {name} | {gib(fp32)} | {gib(bf16)} | {gib(nf4)} | " + " | ".join(gib(s) for s in steps) + " |")


def nf4_error_table(base_ckpt="out/base.pt"):
    """Mean relative error |W - dequant(quant(W))| / |W| (ratio of means) of NF4 with double
    quantization: on Gaussian weights, on a GPT-2-shaped block initialised as GPT-2 is, and on the
    trained projections of the demo's pretrained base (when out/base.pt exists)."""
    from quant import dequantize_nf4, quantize_nf4

    def error(w):
        back = dequantize_nf4(quantize_nf4(w.float(), double_quant=True))
        return ((w - back).abs().mean() / w.abs().mean()).item()
    g = torch.Generator().manual_seed(0)
    rows = [("Gaussian N(0, 1), 1024 x 1024", error(torch.randn(1024, 1024, generator=g))),
            ("GPT-2-shaped c_fc at init, N(0, 0.02), 768 x 3072", error(0.02 * torch.randn(3072, 768, generator=g)))]
    if os.path.isfile(base_ckpt):
        from checkpoint import read_checkpoint
        state = read_checkpoint(base_ckpt)["model"]
        weights = [v for k, v in state.items() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
        errors = [error(w) for w in weights]
        rows.append((f"the demo base's {len(weights)} trained projections ({base_ckpt}), mean over matrices",
                     statistics.mean(errors)))
    print("\nNF4 (block 64, double-quantized constants) mean relative error\n\n| weights | error |\n|---|---|")
    for name, err in rows:
        print(f"| {name} | {100 * err:.2f} % |")


def gib(n):
    return f"{n / 2**30:.2f} GiB"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out-compare", help="where the runs go")
    parser.add_argument("--results", default="results", help="where the report and the figures go")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--sizes", action="store_true", help="print the parameter and memory tables instead")
    args = parser.parse_args()
    if args.sizes:
        sizes()
        sys.exit(0)
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        run_all(args.out, [int(s) for s in args.seeds.split(",")])
    report(args.out, args.results)
