"""
Checkpoints that lose nothing: atomic writes, exact resume, delta checkpoints tied to their base by
sha256, clear errors for corrupt or foreign files, a stop on NaN, Ctrl-C, and DDP on CPU (gloo).

    python -m pytest tests/test_checkpoints.py -q
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train
from train import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--pretrain_iters=20",
        "--pretrain_batch_size=8", "--n_train=200", "--n_val=8", "--batch_size=4", "--eval_max_new_tokens=2",
        "--n_samples=0", "--n_experts=4", "--top_k=2", "--adapter_dim=8", "--lora_rank=4", "--device=cpu",
        "--dtype=float32", "--learning_rate=1e-2"]


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


def test_resume_is_exact(tmp_path, base):
    """8 steps straight == 4 steps, stop, resume, 4 more: same losses and same weights (CPU, bitwise)."""
    straight = run(tmp_path, base, "straight", "--max_iters=8", "--eval_interval=4")
    half = run(tmp_path, base, "half", "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=4")
    run(tmp_path, base, "half", "--init_from=resume", "--max_iters=8", "--eval_interval=4")
    a, b = read_log(straight), read_log(half)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 4, 8]
    for ra, rb in zip(a, b):
        assert ra["val_loss"] == rb["val_loss"]
        assert ra.get("train_loss") == rb.get("train_loss")
    sa = torch.load(f"{straight}/ckpt.pt", weights_only=True)["model"]
    sb = torch.load(f"{half}/ckpt.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["pesc", "dense"])
def test_round_trip(tmp_path, base, method):
    out = run(tmp_path, base, method, f"--method={method}", "--max_iters=3", "--eval_interval=3")
    path = f"{out}/ckpt.pt"
    ckpt = train.read_checkpoint(path)
    assert ckpt["kind"] == ("delta" if method == "pesc" else "dense")
    if method == "pesc":  # only the trainable tensors, plus the base's path and hash
        assert ckpt["base"]["sha256"] == train.file_sha256(base)
        assert all("experts" in k or "router" in k or "lora" in k for k in ckpt["model"])
        assert os.path.getsize(path) < os.path.getsize(base)
    model = train.build_model(ckpt, path).eval()
    idx = torch.randint(0, 256, (2, 20))
    again = train.build_model(train.read_checkpoint(path), path).eval()
    torch.testing.assert_close(model(idx)[0], again(idx)[0], rtol=0, atol=0)
    # and the tensors are the ones that were trained, not a fresh upcycle
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items())


def test_delta_checkpoint_checks_its_base(tmp_path, base):
    own_base = str(tmp_path / "base.pt")
    shutil.copy(base, own_base)
    out = run(tmp_path, own_base, "pesc", "--max_iters=2", "--eval_interval=2")
    path = f"{out}/ckpt.pt"
    # a different base under the same name
    state = torch.load(own_base, weights_only=True)
    state["model"]["transformer.ln_f.weight"] += 1.0
    torch.save(state, own_base)
    with pytest.raises(ValueError, match="sha256.*different file now"):
        train.build_model(train.read_checkpoint(path), path)
    os.remove(own_base)
    with pytest.raises(FileNotFoundError, match="needs its base .*base.pt.*missing"):
        train.build_model(train.read_checkpoint(path), path)


def test_corrupt_and_foreign_checkpoints_are_named(tmp_path, base):
    data = open(base, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt is truncated or corrupt"):
        train.read_checkpoint(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt is not a checkpoint written by train.py"):
        train.read_checkpoint(str(foreign))
    other = train.read_checkpoint(base)
    other["model_args"]["n_embd"] = 64  # the tensors are 32 wide
    with pytest.raises(ValueError, match="another architecture"):
        train.build_model(other, "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.read_checkpoint(str(tmp_path / "missing.pt"))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, dict(kind="dense", model_args={}, value=torch.ones(3)))

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, dict(kind="dense", model_args={}, value=torch.zeros(3)))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_nan_loss_stops_and_names_the_step(tmp_path, base):
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        run(tmp_path, base, "nan", "--max_iters=50", "--eval_interval=50", "--learning_rate=1e30",
            "--grad_clip=0.0", "--method=dense")


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, base, monkeypatch):
    real_lr_at = train.lr_at

    def interrupt_at_step_3(step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, *args)

    monkeypatch.setattr(train, "lr_at", interrupt_at_step_3)
    out = run(tmp_path, base, "ctrl_c", "--max_iters=6", "--eval_interval=6")
    assert train.read_checkpoint(f"{out}/ckpt.pt")["iter_num"] == 3
    monkeypatch.undo()
    run(tmp_path, base, "ctrl_c", "--init_from=resume", "--max_iters=6", "--eval_interval=6")
    assert read_log(out)[-1]["step"] == 6


def flat(load):
    return [share for layer in load for share in layer]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path, base):
    """torchrun with 2 CPU processes (gloo), each running one of the 2 micro-steps, gives the same
    losses as 1 process accumulating both (relative 1e-4)."""
    flags = TINY + [f"--base_ckpt={base}", "--max_iters=4", "--eval_interval=2", "--gradient_accumulation_steps=2"]
    single = str(tmp_path / "single")
    train.main(flags + [f"--out_dir={single}"])
    ddp = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
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
