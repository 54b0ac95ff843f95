"""
Tests for the data pipeline: the generated instruction set, the response mask,
batching, the byte tokenizer and the instruction-file loaders. CPU only, fast.

    python -m pytest tests/test_data.py -q
"""

import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.instruct import (FAMILIES, batch_at, collate, encode_dataset, encode_example, format_prompt,
                           load_instruction_file, make_instruction_set, prompt_ids)
from data.pydocs import encode_corpus, load_pydocs_documents, pretrain_batch, train_val_split
from tokenizer import byte_tokenizer

EOT_ID = 256


@pytest.fixture(scope="module")
def data():
    return make_instruction_set()


@pytest.fixture(scope="module")
def enc():
    return byte_tokenizer()


def prompts(examples):
    return {format_prompt(ex["instruction"], ex["input"]) for ex in examples}


# -----------------------------------------------------------------------------
# the generated instruction set

def test_instruction_set_is_deterministic_per_seed(data):
    assert make_instruction_set() == data
    other = make_instruction_set(seed=7)
    assert other["train"] != data["train"] and other["val"] != data["val"]


def test_sizes_and_family_balance(data):
    assert len(data["train"]) == 6000 and len(data["val"]) == 300
    for split, per_family in (("train", 2000), ("val", 100)):
        counts = {f: sum(ex["family"] == f for ex in data[split]) for f in FAMILIES}
        assert counts == {f: per_family for f in FAMILIES}, (split, counts)


def test_val_prompts_never_in_train(data):
    train, val = prompts(data["train"]), prompts(data["val"])
    assert len(train) == len(data["train"]) and len(val) == len(data["val"])  # unique within
    assert not train & val


def test_val_set_does_not_depend_on_train_size(data):
    assert make_instruction_set(n_train=600)["val"] == data["val"]


def test_code_answers_are_what_python_prints(data):
    """The generator computes answers with a restricted eval(); the claim in the prompt is "what does
    this print": so run every expression through a real `python -c print(...)` and compare."""
    code = [ex for ex in data["train"] + data["val"] if ex["family"] == "code"]
    assert len(code) == 2100
    exprs = []
    for ex in code:
        m = re.fullmatch(r"What does this Python code print\? print\((.*)\)", ex["instruction"])
        assert m, ex["instruction"]
        exprs.append(m.group(1))
    program = "\n".join(f"print({e})" for e in exprs)
    printed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert printed.splitlines() == [ex["output"] for ex in code]


def solve_word_problem(text):
    """An independent solver keyed on each template's question ending."""
    a, b = (int(x) for x in re.findall(r"\d+", text))
    if text.endswith("How many now?"):
        return a + b
    if text.endswith("How many are left?"):
        return a - b
    if text.endswith("in all?"):
        return a * b
    if text.endswith("How many does each get?"):
        assert a % b == 0
        return a // b
    raise AssertionError(f"unrecognised problem: {text}")


def test_math_answers_are_correct(data):
    math = [ex for ex in data["train"][:1000] + data["val"] if ex["family"] == "math"]
    assert len(math) > 400
    for ex in math:
        answer = int(ex["output"])
        assert answer == solve_word_problem(ex["instruction"]), ex
        assert 0 <= answer < 100


def test_general_answers_spot_check(data):
    for ex in data["train"]:
        ins, out = ex["instruction"], ex["output"]
        if ins.startswith("Reverse the word: "):
            assert out == ins[len("Reverse the word: "):][::-1]
        elif ins.startswith("Uppercase: "):
            assert out == ins[len("Uppercase: "):].upper()
        elif ins == "Sort these letters alphabetically.":
            assert out.split() == sorted(ex["input"].split())
        elif ins == "Count the letters in this word.":
            assert out == str(len(ex["input"]))


def test_examples_are_short(data, enc):
    for ex in data["train"] + data["val"]:
        ids, targets = encode_example(enc, ex, 10_000)
        assert len(ids) + 1 <= 128  # prompt + response + EOT


# -----------------------------------------------------------------------------
# encoding, masking, batching

def test_response_mask_covers_exactly_response_and_eot(data, enc):
    for ex in data["val"][:50] + [dict(instruction="Say hi.", input="to Ünïcode ☃", output="hé ☃")]:
        ids, targets = encode_example(enc, ex, 256)
        prompt = list(format_prompt(ex["instruction"], ex.get("input", "")).encode("utf-8"))   # bytes = ids
        assert len(ids) == len(targets) == len(prompt) + len(ex["output"].encode("utf-8"))
        assert ids[:len(prompt)] == prompt
        assert all(t == -1 for t in targets[:len(prompt) - 1])
        kept = [t for t in targets if t != -1]
        assert kept[-1] == EOT_ID
        assert enc.decode(kept) == ex["output"] + "<|endoftext|>"
        full = ids + [EOT_ID]  # the unmasked targets really are the next tokens
        assert all(t == full[j + 1] for j, t in enumerate(targets) if t != -1)


def test_truncation_from_the_right(enc):
    ex = dict(instruction="x" * 20, input="", output="abcdef")
    n_prompt = len(format_prompt("x" * 20))
    ids, targets = encode_example(enc, ex, n_prompt + 2)
    assert len(ids) == len(targets) == n_prompt + 2
    assert enc.decode([t for t in targets if t != -1]) == "abc"
    assert encode_example(enc, ex, n_prompt - 1) is None  # only prompt targets left


def test_collate_pads_right_and_masks(enc):
    batch = [([1, 2, 3], [-1, 3, 4]), ([5], [6])]
    idx, targets, mask = collate(batch, pad_id=0)
    assert idx.dtype == targets.dtype == torch.long and mask.dtype == torch.bool
    assert idx.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert targets.tolist() == [[-1, 3, 4], [6, -1, -1]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_encode_dataset_drops_truncated_and_errors_when_all_dropped(enc):
    short = dict(instruction="hi", input="", output="yo")
    long = dict(instruction="h" * 200, input="", output="yo")
    assert len(encode_dataset(enc, [short, long], 64)) == 1
    with pytest.raises(ValueError, match="all 2 examples were truncated away.*block_size"):
        encode_dataset(enc, [long, long], 64)
    with pytest.raises(ValueError):
        encode_dataset(enc, [], 64)


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    """batch_at: every example once per epoch, in an order that depends on the seed only."""
    encoded = [([i, i], [i, i]) for i in range(10)]
    rows = [batch_at(encoded, step, 5, 7, 0)[0][:, 0].tolist() for step in range(4)]   # 2 epochs of 2 batches
    assert sorted(rows[0] + rows[1]) == list(range(10)) and sorted(rows[2] + rows[3]) == list(range(10))
    assert rows[0] + rows[1] != rows[2] + rows[3]                     # a new order each epoch
    assert batch_at(encoded, 3, 5, 7, 0)[0][:, 0].tolist() == rows[3]  # the same batch whenever asked
    assert batch_at(encoded, 0, 5, 8, 0)[0][:, 0].tolist() != rows[0]  # another seed, another order


def test_prompt_ids_start_with_bos_when_the_tokenizer_has_one(enc):
    ex = dict(instruction="hi", input="")
    assert prompt_ids(enc, ex) == list(format_prompt("hi").encode())
    with_bos = copy.copy(enc)
    with_bos.bos_id = 300
    assert prompt_ids(with_bos, ex) == [300] + list(format_prompt("hi").encode())
    ids, targets = encode_example(with_bos, dict(ex, output="yo"), 64)
    assert ids[0] == 300 and targets[-1] == EOT_ID


# -----------------------------------------------------------------------------
# tokenizer and corpus

def test_pydocs_corpus(enc):
    docs = load_pydocs_documents()
    assert docs == load_pydocs_documents() and len(docs) > 50 and sum(map(len, docs)) > 100_000
    ids = encode_corpus(enc, docs[:2])
    assert ids.dtype == np.uint16
    # each document is followed by EOT, so the base learns what EOT means
    first = len(docs[0].encode("utf-8"))
    assert ids[first] == EOT_ID and ids[-1] == EOT_ID
    assert enc.decode(ids[:first].tolist()) == docs[0]
    train, val = train_val_split(ids, 0.1)
    assert len(val) == int(len(ids) * 0.1) and np.array_equal(np.concatenate([train, val]), ids)
    x, y = pretrain_batch(train, 3, 4, 16, 1)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])   # y is x shifted by one
    assert torch.equal(pretrain_batch(train, 3, 4, 16, 1)[0], x)                # a function of (seed, step)


# -----------------------------------------------------------------------------
# instruction files

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_alpaca_json(tmp_path):
    records = [dict(instruction="Add.", input="2 3", output="5"),
               dict(instruction="Greet.", output="hi"),
               dict(instruction="Greet.", input=None, output="hi", extra=1)]
    examples = load_instruction_file(write(tmp_path, "a.json", json.dumps(records)))
    assert examples == [dict(family="file", instruction="Add.", input="2 3", output="5"),
                        dict(family="file", instruction="Greet.", input="", output="hi"),
                        dict(family="file", instruction="Greet.", input="", output="hi")]


def test_load_chat_and_alpaca_jsonl(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        "",
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "times 3?"},
                      {"role": "assistant", "content": "12"}]},
        {"instruction": "Echo.", "input": "x", "output": "x"},
    ]
    text = "\n".join(json.dumps(x) if x else "" for x in lines) + "\n"
    examples = load_instruction_file(write(tmp_path, "c.jsonl", text))
    assert [ex["family"] for ex in examples] == ["file"] * 3
    assert examples[0] == dict(family="file", instruction="Hi?", input="", output="Hello.")
    assert examples[1]["instruction"] == "Be brief.\n2+2?\nAssistant: 4\ntimes 3?"
    assert examples[1]["output"] == "12"
    assert examples[2] == dict(family="file", instruction="Echo.", input="x", output="x")


GOOD = json.dumps({"instruction": "a", "output": "b"})


@pytest.mark.parametrize("line3, message", [
    ('{"instruction": "a", "output": ', "bad JSON"),
    (json.dumps({"instruction": "a"}), "missing key 'output'"),
    (json.dumps({"instruction": "a", "output": 5}), "'output' must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), "nothing before"),
    ("[1, 2]", "must be an object"),
])
def test_jsonl_errors_name_the_line(tmp_path, line3, message):
    path = write(tmp_path, "bad.jsonl", f"{GOOD}\n{GOOD}\n{line3}\n{GOOD}\n")
    with pytest.raises(ValueError) as err:
        load_instruction_file(path)
    assert "bad.jsonl:3:" in str(err.value) and message in str(err.value), str(err.value)


def test_json_errors_name_the_record(tmp_path):
    path = write(tmp_path, "bad.json", json.dumps([{"instruction": "a", "output": "b"},
                                                   {"instruction": "a"}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 1: missing key 'output'"):
        load_instruction_file(path)
    path = write(tmp_path, "broken.json", '[\n{"instruction": "a",\n "output": }\n]')
    with pytest.raises(ValueError, match=r"broken\.json:3: bad JSON"):
        load_instruction_file(path)
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_instruction_file(write(tmp_path, "obj.json", '{"instruction": "a"}'))


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.jsonl", "\n\n"),
                                        ("e.json", ""), ("e.json", "[]")])
def test_empty_files_have_no_records(tmp_path, name, text):
    with pytest.raises(ValueError, match="has no records"):
        load_instruction_file(write(tmp_path, name, text))


def test_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.json.*\.jsonl"):
        load_instruction_file(write(tmp_path, "data.csv", "a,b\n"))
