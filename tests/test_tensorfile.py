"""
Tests for tensorfile.py (reading .safetensors and torch.save'd weight files, and model folders).

The safetensors files are written by a small writer in this file (struct + json + hand-packed bytes,
nothing shared with tensorfile.py), so expected values and bit patterns are known independently; when
the optional `safetensors` package is installed, files it writes must read the same. CPU only, a second.

    python -m pytest tests/test_tensorfile.py -q
"""

import json
import os
import struct

import pytest
import torch

from tensorfile import (find_weight_files, read_folder, read_safetensors, read_safetensors_header,
                        read_torch_bin, read_weights)


def write_safetensors(path, tensors, metadata=None, align=8):
    """Write a .safetensors file by hand. tensors: {name: (dtype string, shape, raw little-endian
    bytes)}, laid out in that order with no padding between them. The header is padded with spaces so
    the data starts at a multiple of `align`, as the reference writer does. Returns the data start."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % align)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return 8 + len(text)


def write_raw(path, header, data=b""):
    """A file with the given header (a JSON-able object, or raw bytes) and data section."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def bits(t):
    """A tensor's raw bytes as a list of ints, whatever its dtype and shape (0-d and empty included)."""
    return t.reshape(-1).contiguous().view(torch.uint8).tolist()


# bfloat16 values chosen to be exact, with their bit patterns worked out by hand:
# sign | 8-bit exponent (bias 127) | 7-bit mantissa
BF16 = {1.0: 0x3F80, -2.0: 0xC000, 0.5: 0x3F00, 3.0: 0x4040}


def sample_tensors():
    """{name: (dtype, shape, raw bytes, expected python values)} covering every dtype."""
    f32 = [1.5, -2.0, 0.25, 3.0, 100.0, -0.125]
    return {
        "f64": ("F64", [2], struct.pack("<2d", 0.1, -1e300), [0.1, -1e300]),
        "f32": ("F32", [2, 3], struct.pack("<6f", *f32), [f32[:3], f32[3:]]),
        "f16": ("F16", [3], struct.pack("<3e", 0.5, -1.0, 65504.0), [0.5, -1.0, 65504.0]),
        "bf16": ("BF16", [2, 2], struct.pack("<4H", *BF16.values()), [[1.0, -2.0], [0.5, 3.0]]),
        "i64": ("I64", [3], struct.pack("<3q", -1, 2**40, 7), [-1, 2**40, 7]),
        "i32": ("I32", [2], struct.pack("<2i", -5, 2**31 - 1), [-5, 2**31 - 1]),
        "i16": ("I16", [2], struct.pack("<2h", -300, 300), [-300, 300]),
        "i8": ("I8", [2], struct.pack("<2b", -128, 127), [-128, 127]),
        "u8": ("U8", [3], bytes([0, 200, 255]), [0, 200, 255]),
        "flags": ("BOOL", [4], bytes([1, 0, 0, 1]), [True, False, False, True]),
        # float8 e4m3fn: sign | 4-bit exponent (bias 7) | 3-bit mantissa: 0x38 = 1.0, 0xC0 = -2.0
        # float8 e5m2:   sign | 5-bit exponent (bias 15) | 2-bit mantissa: 0x3C = 1.0, 0x40 = 2.0
        "f8a": ("F8_E4M3", [2], bytes([0x38, 0xC0]), [1.0, -2.0]),
        "f8b": ("F8_E5M2", [2], bytes([0x3C, 0x40]), [1.0, 2.0]),
        "scalar": ("F32", [], struct.pack("<f", 42.0), 42.0),
        "empty": ("F32", [0, 3], b"", []),
    }


EXPECTED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                   "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                   "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                   "F8_E5M2": torch.float8_e5m2}


def test_read_every_dtype(tmp_path):
    samples = sample_tensors()
    path = str(tmp_path / "t.safetensors")
    data_start = write_safetensors(path, {k: v[:3] for k, v in samples.items()},
                                   metadata={"format": "pt", "note": "hand-written"})
    entries, metadata, start = read_safetensors_header(path)
    assert metadata == {"format": "pt", "note": "hand-written"}
    assert start == data_start
    assert entries["f32"] == dict(dtype="F32", shape=[2, 3], data_offsets=[16, 40])  # after 2 float64s
    assert "__metadata__" not in entries

    state = read_safetensors(path)
    assert list(state) == list(samples)
    for name, (dtype, shape, raw, values) in samples.items():
        t = state[name]
        assert t.dtype == EXPECTED_DTYPES[dtype], name
        assert list(t.shape) == shape, name
        assert t.device.type == "cpu"
        assert bytes(bits(t)) == raw, name  # the exact bytes, for every dtype
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            assert t.float().tolist() == values, name
        else:
            assert t.tolist() == values, name
    bf16_bits = list(struct.unpack("<4h", samples["bf16"][2]))  # the same bits as signed int16
    assert state["bf16"].view(torch.int16).flatten().tolist() == bf16_bits


def test_misaligned_tensor_is_read_correctly(tmp_path):
    """One byte before a float32 puts it at an odd offset: the format allows it; the reader copies."""
    path = str(tmp_path / "odd.safetensors")
    write_safetensors(path, {"b": ("U8", [1], b"\x07"), "f": ("F32", [3], struct.pack("<3f", 1.0, -2.5, 8.0)),
                             "d": ("F64", [1], struct.pack("<d", 0.3))})
    state = read_safetensors(path)
    assert state["b"].tolist() == [7]
    assert state["f"].tolist() == [1.0, -2.5, 8.0]
    assert state["d"].tolist() == [0.3]
    assert state["f"].data_ptr() % 4 == 0 and state["d"].data_ptr() % 8 == 0


def test_empty_file_of_tensors(tmp_path):
    path = str(tmp_path / "none.safetensors")
    write_safetensors(path, {}, metadata={"format": "pt"})
    assert read_safetensors(path) == {}
    assert read_safetensors_header(path)[:2] == ({}, {"format": "pt"})


def file_mappings(path):
    """(start, end) address ranges of this process's memory maps of `path`, from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == os.path.realpath(path):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_tensors_are_mapped_from_the_file_and_writes_stay_private(tmp_path):
    path = str(tmp_path / "m.safetensors")
    raw = struct.pack("<1024f", *range(1024))
    write_safetensors(path, {"w": ("F32", [32, 32], raw)})
    with open(path, "rb") as f:
        before = f.read()
    w = read_safetensors(path)["w"]
    assert any(start <= w.data_ptr() < end for start, end in file_mappings(path))
    w.add_(1)  # copy-on-write: the tensor changes, the file must not
    assert w[0, 0].item() == 1.0
    with open(path, "rb") as f:
        assert f.read() == before
    assert read_safetensors(path)["w"][0, 0].item() == 0.0


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_reading_a_big_file_costs_no_memory_until_used(tmp_path):
    """64 MB of float32, as a sparse file (the zeros are never written to disk). Opening it must not
    raise resident memory by anything like 64 MB; summing it (touching every page) does, which shows
    the measurement would catch a reader that copies the data."""
    n = 16 * 2**20
    path = str(tmp_path / "big.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    before = rss_bytes()
    w = read_safetensors(path)["w"]
    assert rss_bytes() - before < 16 * 2**20
    assert w.sum().item() == 0.0
    assert rss_bytes() - before > 48 * 2**20


def test_against_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).bfloat16(),
        "f16": torch.randn(3, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(4, generator=g).double(),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(6, generator=g).to(torch.float8_e5m2),
        "i64": torch.arange(-3, 9), "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }
    path = str(tmp_path / "pkg.safetensors")
    st.save_file(tensors, path, metadata={"format": "pt", "source": "test"})
    ours = read_safetensors(path)
    assert read_safetensors_header(path)[1] == {"format": "pt", "source": "test"}
    assert set(ours) == set(tensors)
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        assert bits(ours[name]) == bits(t), name

    # and the other way: the package reads our hand-written file as we do (checks the writer above too)
    hand = str(tmp_path / "hand.safetensors")
    write_safetensors(hand, {k: v[:3] for k, v in sample_tensors().items()})
    theirs, ours = st.load_file(hand), read_safetensors(hand)
    assert set(theirs) == set(ours)
    for name in theirs:
        assert theirs[name].dtype == ours[name].dtype and theirs[name].shape == ours[name].shape, name
        assert bits(theirs[name]) == bits(ours[name]), name


def test_dtype_casts_floats_only(tmp_path):
    path = str(tmp_path / "bf.safetensors")
    write_safetensors(path, {"w": ("BF16", [4], struct.pack("<4H", *BF16.values())),
                             "ids": ("I64", [2], struct.pack("<2q", 3, -4)),
                             "mask": ("BOOL", [2], bytes([0, 1]))})
    state = read_safetensors(path, dtype=torch.float32)
    assert state["w"].dtype == torch.float32 and state["w"].tolist() == list(BF16)
    assert state["ids"].dtype == torch.int64 and state["ids"].tolist() == [3, -4]
    assert state["mask"].dtype == torch.bool and state["mask"].tolist() == [False, True]

    path = str(tmp_path / "f32.safetensors")
    write_safetensors(path, {"w": ("F32", [4], struct.pack("<4f", *BF16)),
                             "ids": ("I32", [1], struct.pack("<i", 9))})
    state = read_weights(path, dtype=torch.bfloat16)
    assert state["w"].dtype == torch.bfloat16
    expected_bits = list(struct.unpack("<4h", struct.pack("<4H", *BF16.values())))
    assert state["w"].view(torch.int16).tolist() == expected_bits
    assert state["ids"].dtype == torch.int32 and state["ids"].tolist() == [9]


def f32_entry(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02\x03", r"3 bytes long, shorter than the 8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}", r"header length says 1000 bytes but the file is only 10 bytes"),
    (struct.pack("<Q", 5) + b"{nope", r"header is not valid JSON"),
    (struct.pack("<Q", 5) + b"[1,2]", r"header is JSON but not a JSON object"),
    (struct.pack("<Q", 8) + b"\xff\xfe{}    ", r"header is not valid JSON"),
], ids=["short", "header-too-long", "bad-json", "not-object", "not-utf8"])
def test_malformed_files_raw(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read_safetensors(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0",
     r"tensor 'w' has unknown dtype 'Q7'"),
    ({"w": f32_entry([2], [0, 4])}, b"\0" * 8,
     r"tensor 'w': shape \[2\] of F32 is 8 bytes but its data_offsets \[0, 4\] span 4 bytes"),
    ({"w": f32_entry([2], [8, 0])}, b"\0" * 8, r"tensor 'w' has data_offsets \[8, 0\] out of range"),
    ({"w": f32_entry([2], [-8, 0])}, b"\0" * 8, r"out of range"),
    ({"w": f32_entry([2, -1], [0, 0])}, b"", r"tensor 'w' has an invalid shape"),
    ({"w": f32_entry([4], [0, 16])}, b"\0" * 8, r"truncated: its tensors need 16 bytes .* only 8 bytes"),
    ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, r"tensor 'w': header entry should be an object with"),
    ({"__metadata__": [1]}, b"", r"__metadata__ should be a JSON object"),
], ids=["dtype", "offsets-size", "offsets-reversed", "offsets-negative", "shape", "truncated",
        "no-offsets", "metadata"])
def test_malformed_headers(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(ValueError, match=message) as e:
        read_safetensors_header(str(path))
    assert str(path) in str(e.value)


def test_a_cut_download_is_reported_as_truncated(tmp_path):
    path = str(tmp_path / "cut.safetensors")
    write_safetensors(path, {"a": ("F32", [2], struct.pack("<2f", 1, 2)),
                             "b": ("I64", [3], struct.pack("<3q", 1, 2, 3))})
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 5)
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(path)


# ----------------------------------------------------------------------------- torch.save files

def test_read_torch_bin(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(4), "h": torch.randn(2).bfloat16()}
    for legacy in (False, True):
        path = str(tmp_path / f"m{legacy}.bin")
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        got = read_torch_bin(path)
        assert set(got) == set(state)
        for k in state:
            assert got[k].dtype == state[k].dtype and torch.equal(got[k], state[k]), (legacy, k)
        cast = read_weights(path, dtype=torch.float64)
        assert cast["w"].dtype == torch.float64 and torch.equal(cast["w"], state["w"].double())
        assert cast["b"].dtype == torch.int64


@pytest.mark.parametrize("obj, message", [
    ([torch.zeros(2)], r"expected a state dict .* got a list"),
    ({"w": torch.zeros(2), "step": 3}, r"'step'"),
], ids=["list", "non-tensor"])
def test_read_torch_bin_rejects_non_state_dicts(tmp_path, obj, message):
    path = str(tmp_path / "x.pt")
    torch.save(obj, path)
    with pytest.raises(ValueError, match=message) as e:
        read_torch_bin(path)
    assert path in str(e.value)


def test_read_torch_bin_unreadable(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not read it as a PyTorch checkpoint") as e:
        read_torch_bin(str(path))
    assert str(path) in str(e.value)


def test_read_weights_unknown_extension(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.safetensors, \.bin, \.pt, \.pth") as e:
        read_weights(str(path))
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- model folders

def f32_file(path, **values):
    """A safetensors file of 1-element float32 tensors {name: value}."""
    write_safetensors(path, {k: ("F32", [1], struct.pack("<f", v)) for k, v in values.items()})


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def sharded_folder(folder, weight_map=None):
    f32_file(folder / SHARD1, a=1.0, c=3.0)
    f32_file(folder / SHARD2, b=2.0)
    weight_map = weight_map or {"a": SHARD1, "b": SHARD2, "c": SHARD1}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def values(state):
    return {k: v.tolist() for k, v in state.items()}


def test_single_file_folder(tmp_path):
    f32_file(tmp_path / "model.safetensors", w=0.5)
    assert find_weight_files(str(tmp_path)) == [str(tmp_path / "model.safetensors")]
    assert values(read_folder(str(tmp_path))) == {"w": [0.5]}


def test_sharded_folder_is_merged(tmp_path):
    sharded_folder(tmp_path)
    assert find_weight_files(str(tmp_path)) == [
        str(tmp_path / name) for name in ("model.safetensors.index.json", SHARD1, SHARD2)]
    assert values(read_folder(str(tmp_path), dtype=torch.float64)) == {"a": [1.0], "b": [2.0], "c": [3.0]}


def test_relative_folder_gives_absolute_paths(tmp_path, monkeypatch):
    f32_file(tmp_path / "model.safetensors", w=0.5)
    monkeypatch.chdir(tmp_path.parent)
    assert find_weight_files(tmp_path.name) == [str(tmp_path / "model.safetensors")]


def test_sharded_bin_folder(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(1, dtype=torch.int64)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    assert values(read_folder(str(tmp_path))) == {"a": [1.0, 1.0], "b": [0]}


def test_missing_shard(tmp_path):
    sharded_folder(tmp_path)
    os.remove(tmp_path / SHARD2)
    with pytest.raises(FileNotFoundError, match=SHARD2) as e:
        find_weight_files(str(tmp_path))
    assert str(tmp_path) in str(e.value) and SHARD1 not in str(e.value)
    with pytest.raises(FileNotFoundError, match=SHARD2):
        read_folder(str(tmp_path))


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    sharded_folder(tmp_path, {"a": SHARD1, "b": SHARD2, "ghost": SHARD2})
    with pytest.raises(ValueError, match=rf"{SHARD2} holds 1 tensor\(s\) that it does not: ghost"):
        read_folder(str(tmp_path))


def test_index_with_a_path_as_shard_is_refused(tmp_path):
    sharded_folder(tmp_path, {"a": "../" + SHARD1})
    with pytest.raises(ValueError, match="not a plain file name"):
        find_weight_files(str(tmp_path))


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        find_weight_files(str(tmp_path))
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        assert name in str(e.value)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError):
        read_folder(str(tmp_path))


def test_safetensors_takes_precedence_over_bin(tmp_path):
    torch.save({"w": torch.tensor([2.0])}, tmp_path / "pytorch_model.bin")
    assert values(read_folder(str(tmp_path))) == {"w": [2.0]}
    f32_file(tmp_path / "model.safetensors", w=1.0)
    assert find_weight_files(str(tmp_path)) == [str(tmp_path / "model.safetensors")]
    assert values(read_folder(str(tmp_path))) == {"w": [1.0]}
