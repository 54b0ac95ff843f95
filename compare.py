"""
The paper's comparison in miniature: dense fine-tune vs the one-adapter dense baseline vs sparse
upcycling vs PESC with 4, 8 and 16 experts, from the same pretrained base, on the embedded
instruction set, with the same steps, data order and learning-rate schedule, for several seeds.

    python compare.py                      # every run (config/compare/*.py x seeds), then the table and figures
    python compare.py --report             # only rebuild the table and figures from finished runs
    python compare.py --gpt2               # the GPT-2-scale parameter / memory table and the CPU step-time ratio

Each run is `python train.py config/compare/common.py config/compare/<name>.py --seed=S` in its own process (so that its
peak memory is its own); its checkpoints and summary land in out-compare/<name>-s<S>/ (git-ignored).
The report goes to results/ (in git): compare.json, compare.md and two PNG figures (matplotlib,
optional: it says how to install it when missing).
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

from train import read_log

ROOT = os.path.dirname(os.path.abspath(__file__))
RUNS = ["dense", "adapter", "sparse8", "pesc4", "pesc8", "pesc16"]  # config/compare/<name>.py, after common.py
LABELS = {"dense": "dense, full fine-tune", "adapter": "dense + 1 adapter (PESC E=1, k=1)",
          "sparse8": "sparse upcycling E=8, k=2", "pesc4": "PESC E=4, k=2", "pesc8": "PESC E=8, k=2",
          "pesc16": "PESC E=16, k=2"}
FAMILIES = ("general", "code", "math")
STEP_TARGET = 1.3  # PESC E=8 training step at most 1.3x the one-adapter baseline's (bench.py --train_step too)


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
               f"--out_dir={run_dir}",
               f"--base_ckpt={base}"]
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


def report(out, dest):
    results = {}
    for path in sorted(glob.glob(os.path.join(out, "*-s*", "result.json"))):
        name = os.path.basename(os.path.dirname(path)).rsplit("-s", 1)[0]
        with open(path) as f:
            results.setdefault(name, []).append(json.load(f))
    names = [n for n in RUNS if n in results]
    if "adapter" not in results:
        sys.exit(f"no finished runs of the adapter baseline under {out}; run python compare.py first")
    base_step = statistics.mean(r["step_time_s"] for r in results["adapter"])
    rows, summary = [], {}
    header = ("| method | " + " | ".join(f"{f} EM %" for f in FAMILIES) + " | average EM % | held-out loss | "
              "total params | trainable | active / token | checkpoint | step time vs adapter | peak RSS |")
    rows.append(header)
    rows.append("|" + " --- |" * (header.count("|") - 1))
    for name in names:
        rs = results[name]
        c = rs[0]["counts"]
        step = statistics.mean(r["step_time_s"] for r in rs)
        summary[name] = dict(
            seeds=[r["seed"] for r in rs],
            exact_match={f: mean_std([r["after"][f] for r in rs]) for f in FAMILIES + ("average",)},
            val_loss=mean_std([r["val_loss"] for r in rs]), counts=c,
            checkpoint_bytes=rs[0]["checkpoint_bytes"], step_time_s=step, step_time_vs_adapter=step / base_step,
            peak_memory_bytes=max(r["peak_memory_bytes"] for r in rs))
        rows.append(f"| {LABELS[name]} | " + " | ".join(pm([r["after"][f] for r in rs]) for f in FAMILIES)
                    + f" | {pm([r['after']['average'] for r in rs])} | {pm([r['val_loss'] for r in rs], 1, 3)} | "
                    f"{c['total'] / 1e6:.2f}M | {c['trainable'] / 1e6:.3f}M | {c['active'] / 1e6:.2f}M | "
                    f"{rs[0]['checkpoint_bytes'] / 2**20:.1f} MiB | {step / base_step:.2f}x | "
                    f"{summary[name]['peak_memory_bytes'] / 2**20:.0f} MiB |")
    seeds = sorted({s for v in summary.values() for s in v["seeds"]})
    table = "\n".join(rows) + (f"\n\nExact match (EM) on the held-out split, mean ± std over seeds {seeds}; "
                               f"before tuning every method scores {results['adapter'][0]['before']['exact_match']['average'] * 100:.1f} %.")
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "compare.json"), "w") as f:
        json.dump(dict(summary=summary, runs=results), f, indent=1)
    with open(os.path.join(dest, "compare.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if "pesc8" in summary and "sparse8" in summary:
        p, s = summary["pesc8"], summary["sparse8"]
        print(f"\ntargets: PESC E=8 step time / adapter baseline = {p['step_time_vs_adapter']:.2f} (<= {STEP_TARGET}); "
              f"trainable PESC/sparse = {p['counts']['trainable'] / s['counts']['trainable']:.3f} (<= 0.2); "
              f"checkpoint PESC/sparse = {p['checkpoint_bytes'] / s['checkpoint_bytes']:.3f} (<= 0.1)")
    figures(out, dest, names, seeds)


def figures(out, dest, names, seeds):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the figures need matplotlib (optional): pip install matplotlib, then python compare.py --report")
        return
    # validation loss against step, mean over seeds
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        curves = []
        for seed in seeds:
            run_dir = os.path.join(out, f"{name}-s{seed}")
            if os.path.isfile(os.path.join(run_dir, "result.json")):  # finished runs only
                curves.append([(r["step"], r["val_loss"]) for r in read_log(run_dir)])
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps[1:], mean[1:], marker="o", ms=3, label=LABELS[name])
    ax.set_xlabel("tuning step")
    ax.set_ylabel("held-out response loss (nats / token)")
    ax.set_title(f"Validation loss, mean over seeds {seeds}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(dest, "val_loss.png"), dpi=120)
    # expert usage per task family per layer for PESC E=8 (the paper's routing analysis)
    usage = expert_usage(os.path.join(out, f"pesc8-s{seeds[0]}", "ckpt.pt"))
    if usage is not None:
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
    import train
    from data.instruct import encode_dataset, make_instruction_set
    ckpt = train.read_checkpoint(ckpt_path)
    model = train.build_model(ckpt, ckpt_path)
    enc = train.load_tokenizer(ckpt["tokenizer"])
    cfg = ckpt["config"]
    val = make_instruction_set(seed=cfg["data_seed"], n_train=cfg["n_train"], n_val=cfg["n_val"])["val"]
    per_family = []
    for fam in FAMILIES:
        encoded = encode_dataset(enc, [ex for ex in val if ex["family"] == fam], model.config.block_size, enc.eot_token)
        _, counts = train.response_loss(model, encoded, 64, enc.eot_token, "cpu", nullcontext())  # (layers, E)
        per_family.append(counts / counts.sum(dim=1, keepdim=True))
    return torch.stack(per_family, dim=1)  # (layers, families, E)


def gpt2_table():
    """Parameter counts and AdamW state for GPT-2 shapes (random weights, on the meta device: no
    memory needed), and the CPU step-time ratio PESC / dense at 124M with real random weights."""
    from model import GPT, GPT2_SIZES, GPTConfig
    from upcycle import count_params, upcycle
    lines = ["| model | method | total | trainable | active / token | AdamW state (fp32) |", "|" + " --- |" * 6]
    for name in ("gpt2", "gpt2-medium", "gpt2-large"):
        n_layer, n_head, n_embd = GPT2_SIZES[name]
        config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, gelu="tanh")
        for method in ("dense", "pesc", "sparse"):
            with torch.device("meta"):
                model = GPT(config)
                if method != "dense":
                    upcycle(model, method=method, n_experts=8, top_k=2, adapter_dim=64, verbose=False)
            c = count_params(model)
            trainable = c["total"] if method == "dense" else c["trainable"]
            label = {"dense": "dense full fine-tune", "pesc": "PESC E=8, r=64", "sparse": "sparse upcycling E=8"}[method]
            lines.append(f"| {name} | {label} | {c['total'] / 1e6:.1f}M | {trainable / 1e6:.2f}M | "
                         f"{c['active'] / 1e6:.1f}M | {8 * trainable / 2**30:.2f} GiB |")
    print("\n".join(lines))
    # CPU step time at 124M: batch 4 x 128 tokens, AdamW, 2 warm-up + 5 timed steps each
    times = {}
    for method in ("dense", "pesc"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50257, gelu="tanh", block_size=128))
        if method == "pesc":
            upcycle(model, n_experts=8, top_k=2, adapter_dim=64, verbose=False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        x = torch.randint(0, 50257, (4, 128))
        for i in range(7):
            if i == 2:
                t0 = time.time()
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times[method] = (time.time() - t0) / 5
    print(f"\nCPU step time at 124M (batch 4 x 128, {torch.get_num_threads()} threads): dense full fine-tune "
          f"{times['dense']:.2f} s, PESC {times['pesc']:.2f} s, ratio PESC / dense {times['pesc'] / times['dense']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out-compare", help="where the runs go")
    parser.add_argument("--results", default="results", help="where the report and the figures go")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--gpt2", action="store_true", help="print the GPT-2-scale table instead")
    args = parser.parse_args()
    if args.gpt2:
        gpt2_table()
        sys.exit(0)
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        run_all(args.out, [int(s) for s in args.seeds.split(",")])
    report(args.out, args.results)
