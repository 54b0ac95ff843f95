"""
Checkpoints that lose nothing: atomic writes, exact resume (every method, with dropout and router
jitter on), delta checkpoints tied to their base by sha256 (a 4-bit run included), clear errors for
corrupt, foreign or old files, a stop on NaN that names the step, Ctrl-C, and DDP on CPU (gloo).

    python -m pytest tests/test_checkpoints.py -q
"""

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

import train
from checkpoint import (base_reference, build_model, make_checkpoint, read_checkpoint, rng_state, save_checkpoint,
                        set_rng_state)
from data.instruct import encode_dataset, make_instruction_set
from evaluate import read_log, response_loss
from tokenizer import byte_tokenizer
from upcycle import upcycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--pretrain_iters=20",
        "--pretrain_batch_size=8", "--n_train=200", "--n_val=8", "--batch_size=4", "--eval_max_new_tokens=2",
        "--n_samples=0", "--n_experts=4", "--top_k=2", "--adapter_dim=8", "--lora_rank=4", "--device=cpu",
        "--dtype=float32", "--learning_rate=1e-2"]
RANDOM = ["--dropout=0.1", "--adapter_dropout=0.1", "--lora_dropout=0.1", "--router_jitter=0.1"]




@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained dense base, shared by the tests below."""
    out = tmp_path_factory.mktemp("base")
    train.main(TINY + [f"--out_dir={out}", f"--base_ckpt={out}/base.pt", "--max_iters=1", "--eval_interval=1"])
    return str(out / "base.pt")


def run(tmp_path, base, name, *flags):
    out = tmp_path / name
    train.main(TINY + [f"--out_dir={out}", f"--base_ckpt={base}", *flags])
    return str(out)


@pytest.mark.parametrize("method", ["pesc", "sparse", "adapter", "lora", "full"])
def test_resume_is_exact_with_randomness_on(tmp_path, base, method):
    """6 steps straight == 3 steps, stop, resume, 3 more: same losses and same weights (CPU, bitwise),
    with every kind of dropout and router jitter on: the RNG state travels in the checkpoint."""
    flags = [f"--method={method}", "--eval_interval=3", *RANDOM] + (["--lora_targets=all"] if method == "lora" else [])
    straight = run(tmp_path, base, "straight", "--max_iters=6", *flags)
    half = run(tmp_path, base, "half", "--max_iters=3", "--lr_decay_iters=6", *flags)
    run(tmp_path, base, "half", "--init_from=resume", "--max_iters=6", *flags)
    a, b = read_log(straight), read_log(half)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 3, 6]
    for ra, rb in zip(a, b):
        assert ra["val_loss"] == rb["val_loss"] and ra.get("train_loss") == rb.get("train_loss")
    sa = torch.load(f"{straight}/ckpt.pt", weights_only=True)["model"]
    sb = torch.load(f"{half}/ckpt.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # and the randomness did act: without it the run takes another path
    calm = run(tmp_path, base, "calm", "--max_iters=6", f"--method={method}", "--eval_interval=3",
               *(["--lora_targets=all"] if method == "lora" else []))
    assert read_log(calm)[1]["train_loss"] != a[1]["train_loss"]


@torch.no_grad()
def perturbed(model):
    """Trained-looking values in every trainable tensor (W_up and LoRA B start at zero)."""
    for p in model.parameters():
        if p.requires_grad:
            p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("method,extra", [("pesc", {}), ("sparse", {}), ("full", {}),
                                          ("pesc", dict(quantize_base=True, lora_targets="all"))])
def test_round_trip_rebuilds_the_model_that_was_saved(tmp_path, base, method, extra):
    """The logits of the model as it was before saving (computed here, in memory) equal those of the
    model rebuilt from the file: a delta checkpoint = its base + upcycle again (re-quantized for a
    4-bit run) + the saved tensors."""
    model = build_model(read_checkpoint(base), base)
    if method == "full":
        model.requires_grad_(True)
    else:
        upcycle(model, method, n_experts=4, top_k=2, adapter_dim=8, lora_rank=4, verbose=False, **extra)
    perturbed(model).eval()
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, _, _ = model(idx)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, make_checkpoint(model, base_reference(base, "train.py"), dict(tokenizer=byte_tokenizer().spec)))
    ckpt = read_checkpoint(path)
    assert ckpt["kind"] == ("full" if method == "full" else "delta")
    if method != "full":  # only the trainable tensors, plus the base's path and hash
        assert ckpt["base"]["sha256"] == hashlib.sha256(open(base, "rb").read()).hexdigest()
        assert all(any(s in k for s in ("w_down", "w_up", "experts", "router", "lora")) for k in ckpt["model"])
        assert os.path.getsize(path) < os.path.getsize(base) or method == "sparse"
    with torch.no_grad():
        after, _, _ = build_model(ckpt, path).eval()(idx)
    assert torch.equal(before, after)


def test_a_trained_checkpoint_reproduces_the_logged_held_out_loss(tmp_path, base):
    """The model rebuilt from train.py's checkpoint gives the held-out loss train.py logged for it in
    the training process."""
    out = run(tmp_path, base, "pesc", "--max_iters=3", "--eval_interval=3")
    ckpt = read_checkpoint(f"{out}/ckpt.pt")
    tok = byte_tokenizer()
    val = make_instruction_set(seed=ckpt["config"]["data_seed"], n_train=200, n_val=8)["val"]
    loss, _ = response_loss(build_model(ckpt, f"{out}/ckpt.pt"), encode_dataset(tok, val, 128), 4, tok.pad_id, "cpu",
                            nullcontext())
    assert loss == pytest.approx(read_log(out)[-1]["val_loss"], rel=1e-6)


def test_delta_checkpoint_checks_its_base(tmp_path, base):
    own_base = str(tmp_path / "base.pt")
    shutil.copy(base, own_base)
    out = run(tmp_path, own_base, "pesc", "--max_iters=2", "--eval_interval=2")
    path = f"{out}/ckpt.pt"
    state = torch.load(own_base, weights_only=True)          # a different base under the same name
    state["model"]["transformer.ln_f.weight"] += 1.0
    torch.save(state, own_base)
    with pytest.raises(ValueError, match="sha256.*different file now"):
        build_model(read_checkpoint(path), path)
    os.remove(own_base)
    with pytest.raises(FileNotFoundError, match="needs its base .*base.pt.*missing"):
        build_model(read_checkpoint(path), path)


def test_corrupt_foreign_and_old_checkpoints_are_named(tmp_path, base):
    data = open(base, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt is truncated or corrupt"):
        read_checkpoint(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt is not a checkpoint written by train.py"):
        read_checkpoint(str(foreign))
    old = tmp_path / "old.pt"
    torch.save(dict(kind="dense", model_args={}, model={}), old)   # the layout before experts were stacked
    with pytest.raises(ValueError, match="earlier version of this project.*layout 1"):
        read_checkpoint(str(old))
    other = read_checkpoint(base)
    other["model_args"]["n_embd"] = 64  # the tensors are 32 wide
    with pytest.raises(ValueError, match="another architecture"):
        build_model(other, "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.pt"))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, dict(kind="full", model_args={}, value=torch.ones(3)))

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, dict(kind="full", model_args={}, value=torch.zeros(3)))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_nan_loss_stops_and_names_the_step_without_saving_it(tmp_path, base):
    """The loss is checked on the device every step and read only on log steps; the error still names
    the first bad step, and no checkpoint of the broken state is written."""
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) at step (\d+)") as info:
        run(tmp_path, base, "nan", "--max_iters=50", "--eval_interval=50", "--learning_rate=1e30",
            "--grad_clip=0.0", "--method=full", "--log_interval=7")
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert step < 7                            # the first bad step, found at the first log step after it
    assert not os.path.exists(tmp_path / "nan" / "ckpt.pt")


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, base):
    """A real SIGINT to a running train.py: it saves the last finished step, and resuming from there
    ends where an uninterrupted run ends."""
    flags = TINY + [f"--base_ckpt={base}", "--max_iters=400", "--lr_decay_iters=400", "--eval_interval=400",
                    "--dropout=0.1"]
    out = tmp_path / "ctrl_c"
    # one thread, as this test process runs (conftest.py): bitwise-equal sums need the same threading
    proc = subprocess.Popen([sys.executable, "train.py", *flags, f"--out_dir={out}"], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").stat().st_size):
        time.sleep(0.2)                        # the before-tuning evaluation is done: tuning runs
    time.sleep(2.0)                            # some tuning steps
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert "interrupted: saved step" in output, output[-2000:]
    stopped = read_checkpoint(str(out / "ckpt.pt"))["iter_num"]
    assert 0 < stopped < 400
    total = stopped + 3
    run(tmp_path, base, "ctrl_c", "--init_from=resume", f"--max_iters={total}", "--lr_decay_iters=400",
        f"--eval_interval={total}", "--dropout=0.1")
    straight = run(tmp_path, base, "straight", f"--max_iters={total}", "--lr_decay_iters=400",
                   f"--eval_interval={total}", "--dropout=0.1")
    sa = torch.load(f"{straight}/ckpt.pt", weights_only=True)["model"]
    sb = torch.load(str(out / "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flat(load):
    return [share for layer in load for share in layer]


def test_ddp_two_processes_match_one(tmp_path, base):
    """torchrun with 2 CPU processes (gloo), each running one of the 2 micro-steps, gives the same
    losses as 1 process accumulating both (relative 1e-4)."""
    flags = TINY + [f"--base_ckpt={base}", "--max_iters=4", "--eval_interval=2", "--gradient_accumulation_steps=2"]
    single = str(tmp_path / "single")
    train.main(flags + [f"--out_dir={single}"])
    ddp = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={free_port()}", "train.py", *flags, f"--out_dir={ddp}", "--backend=gloo"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_log(single), read_log(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 4]
    for ra, rb in zip(a[1:], b[1:]):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
        # routing statistics were summed over both ranks: the same shares as the single process
        assert flat(rb["train_expert_load"]) == pytest.approx(flat(ra["train_expert_load"]), rel=1e-3)


def test_rng_state_includes_every_cuda_generator(monkeypatch):
    """Resume restores the CUDA generators too, not only the CPU one (recorded calls, no GPU needed)."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0", "gpu1"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.setdefault("set", states))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    state = rng_state()
    torch.rand(5)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)          # the CPU generator is back where it was
    assert state["cuda"] == ["gpu0", "gpu1"] and calls["set"] == ["gpu0", "gpu1"]


def test_resuming_a_finished_run_says_what_to_do(tmp_path, base):
    out = run(tmp_path, base, "done", "--max_iters=2", "--eval_interval=2")
    with pytest.raises(ValueError, match="at step 2 already: raise --max_iters"):
        run(tmp_path, base, "done", "--init_from=resume", "--max_iters=2")
    assert read_checkpoint(f"{out}/ckpt.pt")["iter_num"] == 2


def test_a_delta_checkpoint_with_foreign_tensors_is_refused(tmp_path, base):
    model = upcycle(build_model(read_checkpoint(base), base), "pesc", n_experts=4, top_k=2, adapter_dim=8, verbose=False)
    ckpt = make_checkpoint(model, base_reference(base, "train.py"), {})
    ckpt["model"]["transformer.h.0.mlp.w_extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match="unexpected .*w_extra"):
        build_model(ckpt, "extra.pt")


def test_a_bf16_full_checkpoint_comes_back_in_bf16(tmp_path, base):
    model = build_model(read_checkpoint(base), base).to(torch.bfloat16)
    path = str(tmp_path / "bf16.pt")
    save_checkpoint(path, make_checkpoint(model, None, {}))
    rebuilt = build_model(read_checkpoint(path), path)
    assert {p.dtype for p in rebuilt.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
