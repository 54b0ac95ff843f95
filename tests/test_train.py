"""
train.py and sample.py end to end on a tiny model (seconds on a CPU), the strict config, and the
training loop's promises (cross-entropy and aux loss logged apart, a router that learns).

    python -m pytest tests/test_train.py -q
"""

import glob
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import sample
import train
from checkpoint import build_model, read_checkpoint
from configurator import parse_config
from costs import mfu, training_flops_per_token
from evaluate import greedy_answers, read_log
from model import GPT, MLP, GPTConfig
from moe import PESCMoE
from optim import make_optimizer
from tokenizer import load_tokenizer
from upcycle import upcycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--pretrain_iters=30",
        "--pretrain_batch_size=8", "--n_train=300", "--n_val=12", "--batch_size=8", "--eval_max_new_tokens=4",
        "--n_samples=1", "--n_experts=4", "--top_k=2", "--adapter_dim=8", "--lora_rank=4", "--device=cpu",
        "--dtype=float32", "--log_interval=1000"]




@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny PESC run: pretrains a base, upcycles, tunes 40 steps. Returns its out_dir."""
    out = tmp_path_factory.mktemp("run")
    result = train.main(TINY + [f"--out_dir={out}", f"--base_ckpt={out}/base.pt", "--max_iters=40",
                                "--eval_interval=20", "--learning_rate=1e-2"])
    return out, result


def test_training_reduces_held_out_loss(tuned):
    out, result = tuned
    rows = read_log(out)
    assert rows[0]["stage"] == "before" and [r["step"] for r in rows[1:]] == [20, 40]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.3, rows  # nats per response token
    assert set(rows[-1]["exact_match"]) == {"general", "code", "math", "average"}
    assert len(rows[-1]["expert_load"]) == 1                          # one MoE layer
    # adapters (4 x 2 x 32 x 8) + router (32 x 4) + LoRA r=4 on c_attn (4 x (32 + 96)) and c_proj (4 x 64)
    assert result["counts"]["trainable"] == 4 * 2 * 32 * 8 + 32 * 4 + 4 * (32 + 96) + 4 * (32 + 32)


def test_result_json_records_throughput(tuned):
    out, result = tuned
    with open(os.path.join(out, "result.json")) as f:
        assert json.load(f) == result
    assert result["mfu"] is None                          # MFU only on a GPU (a peak FLOP rate to divide by)
    # tokens per step = tokens/s x s/step: the real (unpadded) tokens of 8 sequences (--batch_size=8), <= 128 each
    # (a rate of steps, or of sequences, or per millisecond would land outside)
    assert 8 * 10 <= result["tokens_per_s"] * result["step_time_s"] <= 8 * 128


def test_second_run_reuses_the_cached_base(tuned, capsys):
    out, _ = tuned
    mtime = os.path.getmtime(f"{out}/base.pt")
    train.main(TINY + [f"--out_dir={out}/again", f"--base_ckpt={out}/base.pt", "--max_iters=2", "--eval_interval=2"])
    assert "loaded the dense base" in capsys.readouterr().out
    assert os.path.getmtime(f"{out}/base.pt") == mtime


def test_cached_base_of_another_size_is_an_error(tuned):
    out, _ = tuned
    with pytest.raises(ValueError, match="init_from=scratch"):
        train.main(TINY + [f"--out_dir={out}/x", f"--base_ckpt={out}/base.pt", "--n_embd=64"])


@pytest.mark.parametrize("method", ["full", "adapter", "sparse", "lora"])
def test_every_method_trains(tuned, method):
    out, _ = tuned
    train.main(TINY + [f"--out_dir={out}/{method}", f"--base_ckpt={out}/base.pt", f"--method={method}",
                       "--max_iters=6", "--eval_interval=6", "--lora_targets=all" if method == "lora" else "--seed=1"])
    rows = read_log(f"{out}/{method}")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert (rows[-1]["expert_load"] is None) == (method in ("full", "lora"))


def test_logged_train_loss_is_cross_entropy_and_aux_is_apart(tuned):
    """With learning_rate 0 nothing moves, so the logged training loss must not depend on alpha;
    the aux loss, logged apart, scales with it (alpha * Eq. 10 ~ alpha at near balance)."""
    out, _ = tuned
    rows = {}
    for alpha in (0.0, 10.0):
        train.main(TINY + [f"--out_dir={out}/alpha{alpha}", f"--base_ckpt={out}/base.pt", "--learning_rate=0.0",
                           f"--aux_loss_coef={alpha}", "--max_iters=2", "--eval_interval=2"])
        rows[alpha] = read_log(f"{out}/alpha{alpha}")[-1]
    assert rows[0.0]["train_loss"] == pytest.approx(rows[10.0]["train_loss"], rel=1e-6)
    assert rows[0.0]["aux_loss"] == 0.0 and rows[10.0]["aux_loss"] > 5.0


def test_dropout_reaches_the_model_tuned_from_a_cached_base_and_survives_resume(tuned):
    """The cached base was pretrained without dropout; --dropout applies to the tuned model, and a
    resume keeps it (it used to fall back to the base's saved 0)."""
    out, _ = tuned
    run = f"{out}/dropout"
    flags = TINY + [f"--out_dir={run}", f"--base_ckpt={out}/base.pt", "--dropout=0.2", "--eval_interval=2"]
    train.main(flags + ["--max_iters=2", "--lr_decay_iters=4"])
    assert read_checkpoint(f"{out}/base.pt")["model_args"]["dropout"] == 0.0
    assert read_checkpoint(f"{run}/ckpt.pt")["model_args"]["dropout"] == 0.2
    train.main(flags + ["--max_iters=4", "--init_from=resume"])
    ckpt = read_checkpoint(f"{run}/ckpt.pt")
    assert ckpt["iter_num"] == 4 and ckpt["model_args"]["dropout"] == 0.2
    assert build_model(ckpt, f"{run}/ckpt.pt").config.dropout == 0.2


# -----------------------------------------------------------------------------
# a router that learns: the test fails with a dead router or wrong gates

def test_the_router_learns_to_send_each_task_family_to_its_own_experts():
    """Two families of inputs, each wanting its own correction of the FFN output. Phase 1 trains
    adapters and router together, so that experts specialise. Phase 2 scrambles the router, freezes
    the experts and trains the router alone: only the gates of Eq. 9 can bring the loss back down, by
    sending each family to its experts again. A dead router gradient or gates that ignore the routing
    leave the loss where phase 2 started."""
    torch.manual_seed(0)
    d, E = 16, 4
    ffn = MLP(GPTConfig(n_embd=d, n_head=2))
    layer = PESCMoE(ffn, d, n_experts=E, top_k=2, adapter_dim=8, aux_loss_coef=0.0, dispatch="masked")
    g = torch.Generator().manual_seed(1)
    mean_a, mean_b = 2 * torch.randn(d, generator=g), 2 * torch.randn(d, generator=g)
    h = torch.cat([mean_a + 0.3 * torch.randn(128, d, generator=g), mean_b + 0.3 * torch.randn(128, d, generator=g)])
    fix = torch.cat([torch.randn(d, generator=g).expand(128, d), torch.randn(d, generator=g).expand(128, d)])
    with torch.no_grad():
        target = ffn(h) + fix                                   # family A wants +c_A, family B +c_B

    def fit(params, steps, lr):
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            y, (aux, _, _) = layer(h)
            loss = (y - target).square().mean()
            (loss + aux).backward()
            opt.step()
            opt.zero_grad()
        return loss.item()
    fit([layer.w_down, layer.w_up, layer.router.gate.weight], 400, 1e-2)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0.0, 0.3, generator=g)   # scrambled routing
        start = (layer(h)[0] - target).square().mean().item()
    end = fit([layer.router.gate.weight], 150, 5e-2)
    assert end < 0.5 * start, (start, end)
    with torch.no_grad():
        _, (_, _, indices) = layer(h)
    top_a = indices[:128, 0].bincount(minlength=E).argmax()     # each family's highest-weighted expert
    top_b = indices[128:, 0].bincount(minlength=E).argmax()
    assert top_a != top_b


# -----------------------------------------------------------------------------
# config

def test_config_flags_are_typed_through_train_main():
    cfg = train.main(["--learning_rate=1", "--max_iters=7", "--init_from=gpt2", "--torch_compile=True",
                      "--print_config=True"])
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float
    assert cfg["max_iters"] == 7 and cfg["init_from"] == "gpt2" and cfg["torch_compile"] is True


DEFAULTS = dict(max_iters=10, learning_rate=1e-3, torch_compile=False, init_from="base", batch_size=32)


def test_unknown_flag_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown config key 'learning_rat'.*valid keys:.*learning_rate"):
        parse_config(["--learning_rat=1e-3"], DEFAULTS)


def test_renamed_keys_name_their_new_spelling():
    with pytest.raises(ValueError, match="'compile' in --compile=True was renamed: use 'torch_compile'"):
        parse_config(["--compile=True"], DEFAULTS)
    with pytest.raises(ValueError, match="method='dense' was renamed: use --method=full"):
        train.main(["--method=dense"])
    with pytest.raises(ValueError, match="dispatch='dense' was renamed: use dispatch='masked'"):
        train.main(["--dispatch=dense"])


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("max_iters = 10\nn_expert = 4\n")  # misspelled: nanoGPT would silently accept it
    with pytest.raises(ValueError, match=r"unknown config key 'n_expert' in .*cfg\.py"):
        train.main([str(f)])


def test_wrong_types_are_errors(tmp_path):
    with pytest.raises(ValueError, match="max_iters .* must be int"):
        parse_config(["--max_iters=1.5"], DEFAULTS)
    with pytest.raises(ValueError, match="torch_compile .* must be bool"):
        parse_config(["--torch_compile=1"], DEFAULTS)
    f = tmp_path / "cfg.py"
    f.write_text("batch_size = '32'\n")
    with pytest.raises(ValueError, match="batch_size .* must be int"):
        parse_config([str(f)], DEFAULTS)
    with pytest.raises(ValueError, match="--key=value"):
        parse_config(["--max_iters"], DEFAULTS)


@pytest.mark.parametrize("flag,message", [
    ("--dtype=float16", "needs loss scaling"),
    ("--method=moe", "method must be one of"),
    ("--max_iters=0", "max_iters must be positive"),
    ("--quantize_base=True", None),     # fine with pesc
])
def test_settings_that_cannot_work_are_refused(flag, message):
    if message is None:
        assert train.main([flag, "--print_config=True"])["quantize_base"] is True
        with pytest.raises(ValueError, match="needs a parameter-efficient method"):
            train.main([flag, "--method=full"])
        return
    with pytest.raises(ValueError, match=message):
        train.main([flag])


def test_command_line_errors_are_one_clear_line():
    r = subprocess.run([sys.executable, "train.py", "--n_expert=4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: unknown config key 'n_expert'") and "Traceback" not in r.stderr


def test_every_config_file_parses():
    paths = sorted(glob.glob(os.path.join(ROOT, "config", "**", "*.py"), recursive=True))
    assert len(paths) >= 6
    for path in paths:
        common = [os.path.join(ROOT, "config", "compare", "common.py")] if "compare" in path else []
        cfg = train.main(common + [path, "--print_config=True"])
        assert cfg["out_dir"] != "out" or "compare" in path or "qlora" in path   # each run writes its own folder


# -----------------------------------------------------------------------------
# sample.py

def test_sample_is_deterministic_under_a_seed(tuned):
    out, _ = tuned
    args = [f"--ckpt={out}/ckpt.pt", "--prompt=Reverse the word: lemon", "--max_new_tokens=12",
            "--temperature=1.0", "--device=cpu"]
    a = sample.main(args + ["--seed=3", "--num_samples=2"])
    b = sample.main(args + ["--seed=3", "--num_samples=2"])
    c = sample.main(args + ["--seed=4", "--num_samples=2"])
    assert a == b
    assert a != c  # temperature 1 on a barely tuned model: another seed gives other text


def test_show_experts_names_the_experts_each_token_went_to_during_generation(tuned, capsys):
    """The experts sample.py shows for a generated token are the ones the router picked when that
    token was fed in during the cached generation (recorded here from the layer's own outputs)."""
    out, _ = tuned
    flags = [f"--ckpt={out}/ckpt.pt", "--prompt=Uppercase: kiwi", "--max_new_tokens=5", "--temperature=0",
             "--device=cpu"]
    ckpt = read_checkpoint(f"{out}/ckpt.pt")
    model = build_model(ckpt, f"{out}/ckpt.pt").eval()
    tok = load_tokenizer(ckpt["tokenizer"])
    fed = []
    model.moe_layers()[0].register_forward_hook(lambda m, args, output: fed.append(output[1][2].tolist()))
    ids = tok.encode("Q: Uppercase: kiwi\nA: ")
    generated = model.generate(torch.tensor([ids]), 5, temperature=0, eos_id=tok.eos_id, n_vocab=tok.n_vocab)
    during = [step[-1] for step in fed[1:]]           # each decode step routes exactly the newly fed token
    sample.main(flags + ["--show_experts=True"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("experts per generated token"))
    rows = [line for line in lines[start + 1:] if not line.startswith("-")]
    assert len(rows) == generated.size(1) - len(ids)
    shown = [[int(c) for c in row.split()[-1].split(",")] for row in rows]
    assert shown[:len(during)] == during and len(during) >= 1
    assert all(len(set(c)) == 2 and all(0 <= e < 4 for e in c) for c in shown)


def test_sample_without_prompt_is_an_error(tuned):
    out, _ = tuned
    with pytest.raises(ValueError, match="give a prompt"):
        sample.main([f"--ckpt={out}/ckpt.pt"])


def test_greedy_sample_matches_training_evaluation(tuned):
    """sample.py and the evaluation share the template and the decoding."""
    out, _ = tuned
    ckpt = read_checkpoint(f"{out}/ckpt.pt")
    model = build_model(ckpt, f"{out}/ckpt.pt").eval()
    ex = dict(family="general", instruction="Uppercase: kiwi", input="", output="KIWI")
    want = greedy_answers(model, load_tokenizer(ckpt["tokenizer"]), [ex], 6, "cpu", nullcontext())[0]
    got = sample.main([f"--ckpt={out}/ckpt.pt", "--prompt=Uppercase: kiwi", "--max_new_tokens=6",
                       "--temperature=0", "--device=cpu"])[0]
    assert got == want


def test_batched_evaluation_answers_as_each_prompt_alone(tuned):
    """greedy_answers batches prompts of different lengths (right-padded); each answer must be the one
    the prompt gets alone, and come back in the examples' order."""
    out, _ = tuned
    ckpt = read_checkpoint(f"{out}/ckpt.pt")
    model = build_model(ckpt, f"{out}/ckpt.pt").eval()
    with torch.no_grad():            # the barely tuned model answers every prompt alike: make them differ
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    tok = load_tokenizer(ckpt["tokenizer"])
    words = ["kiwi", "fig", "watermelon", "plum", "apricot", "lemon", "persimmon"]
    examples = [dict(family="general", instruction=f"Uppercase: {w}", input="x" * i, output=w.upper())
                for i, w in enumerate(words)]
    alone = [greedy_answers(model, tok, [ex], 8, "cpu", nullcontext())[0] for ex in examples]
    batched = greedy_answers(model, tok, examples, 8, "cpu", nullcontext(), batch_size=3)
    assert batched == alone
    assert len(set(alone)) > 1


# -----------------------------------------------------------------------------
# the optimizer, MFU, data files

def test_weight_decay_only_on_matrices_never_on_norms_biases_or_routers():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    upcycle(model, n_experts=4, top_k=2, adapter_dim=4, lora_rank=2, verbose=False)
    opt = make_optimizer(model, 1e-3, 0.1, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "transformer.h.0.attn.c_attn.lora_A", "transformer.h.0.attn.c_attn.lora_B",
        "transformer.h.0.attn.c_proj.lora_A", "transformer.h.0.attn.c_proj.lora_B",
        "transformer.h.0.mlp.w_down", "transformer.h.0.mlp.w_up"]
    assert [names[id(p)] for p in no_decay["params"]] == ["transformer.h.0.mlp.router.gate.weight"]


def test_mfu_formula_against_a_flop_counter():
    """4 N_active + 2 N_trainable per token (+ attention), against the matmul FLOPs torch's
    FlopCounterMode counts in a real training step of a PESC model. The counter sees no attention on
    the CPU, and the formula over-counts a little on purpose: position embeddings, norms and biases
    (no matmul) and the first layer's input gradient, which autograd skips (nothing below it trains).
    A 6 N formula (a full fine-tune's) is 50 % off here."""
    from torch.utils.flop_counter import FlopCounterMode
    from upcycle import count_params
    torch.manual_seed(0)
    B, T, L, d = 4, 32, 2, 64
    model = GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=L, n_head=4, n_embd=d))
    upcycle(model, "pesc", n_experts=4, top_k=4, adapter_dim=16, lora_rank=4, dispatch="masked", verbose=False)
    idx = torch.randint(256, (B, T))
    with FlopCounterMode(display=False) as counter:
        _, ce, routing = model(idx, idx)
        (ce + routing.aux_loss).backward()
    counted = counter.get_total_flops() / (B * T)
    counts = count_params(model)
    without_attention = training_flops_per_token(counts, L, T, d) - 12 * L * T * d
    assert counted <= without_attention <= 1.15 * counted
    assert 6 * counts["active"] > 1.4 * counted
    assert mfu(1188 * 1e9, "bfloat16") == pytest.approx(1188e9 / 989e12)   # H100/H200 dense bf16 peak
    assert mfu(1e12, "bfloat16", peak_flops=2e12) == 0.5


def test_training_on_a_user_file(tuned, tmp_path):
    out, _ = tuned
    data = tmp_path / "mine.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Echo {w}"}, {"role": "assistant", "content": w}]}
            for w in ["red", "green", "blue", "cyan", "pink", "gold", "grey", "teal", "navy", "plum"] * 3]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = train.main(TINY + [f"--out_dir={tmp_path}/run", f"--base_ckpt={out}/base.pt", f"--dataset={data}",
                                "--max_iters=4", "--eval_interval=4"])
    assert set(result["after"]) == {"file", "average"}  # one family for a user's file
    assert read_log(f"{tmp_path}/run")[-1]["step"] == 4


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        train.main(TINY + [f"--out_dir={tmp_path}", f"--dataset={tmp_path}/nope.json"])


def test_bench_train_step_times_every_method(tmp_path):
    """bench.py --train_step runs interleaved steps of each model and reports each against the
    one-adapter baseline."""
    out = tmp_path / "steps.json"
    r = subprocess.run([sys.executable, "bench.py", "--train_step", "--runs", "2", "--warmup", "0", "--d", "32",
                        "--r", "8", "--layers", "1", "--batch", "4", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"adapter", "pesc4", "pesc8", "pesc16", "sparse8", "full"}
    assert "PESC E=8 vs one adapter" in r.stdout
