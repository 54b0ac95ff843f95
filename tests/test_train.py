"""
train.py and sample.py end to end, on a tiny model (seconds on a CPU).

    python -m pytest tests/test_train.py -q
"""

import glob
import json
import os
import subprocess
import sys

import pytest

import sample
import train
from train import read_log

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
    assert rows[-1]["aux_loss"] > 0 and len(rows[-1]["expert_load"]) == 1  # one MoE layer
    assert result["counts"]["trainable"] < result["counts"]["total"]


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


@pytest.mark.parametrize("method", ["dense", "adapter", "sparse"])
def test_every_method_trains(tuned, method):
    out, _ = tuned
    train.main(TINY + [f"--out_dir={out}/{method}", f"--base_ckpt={out}/base.pt", f"--method={method}",
                       "--max_iters=6", "--eval_interval=6"])
    rows = read_log(f"{out}/{method}")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert (rows[-1]["expert_load"] is None) == (method == "dense")


# -----------------------------------------------------------------------------
# config

DEFAULTS = train.DEFAULTS


def test_config_flags_are_typed():
    cfg = train.parse_config(["--learning_rate=1", "--max_iters=7", "--init_from=gpt2", "--compile=True"], DEFAULTS)
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float
    assert cfg["max_iters"] == 7 and cfg["init_from"] == "gpt2" and cfg["compile"] is True


def test_unknown_flag_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown config key 'learning_rat'.*valid keys:.*learning_rate"):
        train.parse_config(["--learning_rat=1e-3"], DEFAULTS)


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("max_iters = 10\nn_expert = 4\n")  # misspelled: nanoGPT would silently accept it
    with pytest.raises(ValueError, match=r"unknown config key 'n_expert' in .*cfg\.py"):
        train.parse_config([str(f)], DEFAULTS)


def test_wrong_types_are_errors(tmp_path):
    with pytest.raises(ValueError, match="max_iters .* must be int"):
        train.parse_config(["--max_iters=1.5"], DEFAULTS)
    with pytest.raises(ValueError, match="compile .* must be bool"):
        train.parse_config(["--compile=1"], DEFAULTS)
    f = tmp_path / "cfg.py"
    f.write_text("batch_size = '32'\n")
    with pytest.raises(ValueError, match="batch_size .* must be int"):
        train.parse_config([str(f)], DEFAULTS)
    with pytest.raises(ValueError, match="--key=value"):
        train.parse_config(["--max_iters"], DEFAULTS)


def test_command_line_errors_are_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--n_expert=4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: unknown config key 'n_expert'") and "Traceback" not in r.stderr


def test_every_config_file_parses():
    paths = sorted(glob.glob(os.path.join(ROOT, "config", "**", "*.py"), recursive=True))
    assert len(paths) >= 3
    for path in paths:
        train.parse_config([path], DEFAULTS)


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


def test_show_experts_names_valid_expert_ids(tuned, capsys):
    out, _ = tuned
    sample.main([f"--ckpt={out}/ckpt.pt", "--prompt=Uppercase: kiwi", "--max_new_tokens=5", "--temperature=0",
                 "--show_experts=True", "--device=cpu"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("experts per generated token"))
    rows = [line for line in lines[start + 1:] if not line.startswith("-")]
    assert len(rows) >= 1
    for row in rows:
        choices = row.split()[-1]  # one MoE layer in the tiny model: "i,j"
        ids = [int(c) for c in choices.split(",")]
        assert len(ids) == 2 and len(set(ids)) == 2 and all(0 <= i < 4 for i in ids)


def test_sample_without_prompt_is_an_error(tuned):
    out, _ = tuned
    with pytest.raises(ValueError, match="give a prompt"):
        sample.main([f"--ckpt={out}/ckpt.pt"])


def test_greedy_sample_matches_training_evaluation(tuned):
    """sample.py and the evaluation in train.py share the template and the decoding."""
    out, _ = tuned
    ckpt = train.read_checkpoint(f"{out}/ckpt.pt")
    model = train.build_model(ckpt, f"{out}/ckpt.pt").eval()
    from data.pydocs import get_tokenizer
    enc = get_tokenizer("bytes")
    ex = dict(family="general", instruction="Uppercase: kiwi", input="", output="KIWI")
    from contextlib import nullcontext
    want = train.greedy_answers(model, enc, [ex], 6, "cpu", nullcontext())[0]
    got = sample.main([f"--ckpt={out}/ckpt.pt", "--prompt=Uppercase: kiwi", "--max_new_tokens=6",
                       "--temperature=0", "--device=cpu"])[0]
    assert got == want


def test_weight_decay_only_on_matrices_never_on_norms_biases_or_routers():
    from model import GPT, GPTConfig
    from upcycle import upcycle
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    upcycle(model, n_experts=4, top_k=2, adapter_dim=4, lora_rank=2, verbose=False)
    opt = train.make_optimizer(model, 1e-3, 0.1, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any("router" in n for n in names) and any("experts" in n for n in names)
    for name, p in names.items():
        assert (id(p) in decayed) == (p.dim() >= 2 and ".router." not in name), name
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)  # frozen weights are not in it


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
    with pytest.raises(FileNotFoundError, match="dataset file .*nope.json does not exist"):
        train.main(TINY + [f"--out_dir={tmp_path}", f"--dataset={tmp_path}/nope.json"])


def test_bench_train_step_times_every_comparison_model(tmp_path):
    """bench.py --train_step runs one interleaved step of every model in config/compare and reports
    each as a ratio to the one-adapter baseline (1.0 for the baseline itself)."""
    from compare import RUNS
    out = tmp_path / "steps.json"
    r = subprocess.run([sys.executable, "bench.py", "--train_step", "--runs", "1", "--warmup", "0", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == RUNS
    assert rows["adapter"]["vs_adapter"] == 1.0
    assert all(row["step_ms"] > 0 for row in rows.values())
    assert "target: PESC E=8 step / adapter baseline" in r.stdout
