"""
Reading model weight files (.safetensors, PyTorch .bin/.pt) with no package beyond numpy and torch.

A .safetensors file is three parts, one after another:

    bytes [0, 8)            N, the length of the header: an unsigned 64-bit little-endian integer
    bytes [8, 8 + N)        the header: UTF-8 JSON (possibly padded with spaces), one object
                                {"wte.weight": {"dtype": "F32", "shape": [50257, 768],
                                                "data_offsets": [begin, end]},
                                 ...,
                                 "__metadata__": {"format": "pt", ...}}    <- optional, str -> str
    bytes [8 + N, EOF)      the data: tensor t's bytes are [8 + N + begin, 8 + N + end), row-major,
                            little-endian, with no padding inside a tensor

So reading needs no parser beyond json: we map the file into memory (numpy.memmap), and each tensor is
a view of its byte range. Nothing is read from disk until a tensor's values are used, so opening a
multi-GB checkpoint is instant and costs no RAM until the model copies the weights.

A Hugging Face model folder holds one weight file (model.safetensors or pytorch_model.bin), or, for a
big model, an index (model.safetensors.index.json) whose "weight_map" says which shard file holds
each tensor. find_weight_files / read_folder handle both.

    from tensorfile import read_folder, read_weights
    state = read_folder("path/to/hf-model-folder")            # {name: tensor}, all shards merged
    state = read_weights("model.safetensors", dtype=torch.float32)

Tests: python -m pytest tests/test_tensorfile.py -q
"""

import json
import math
import os
import struct
import sys
import zipfile

import numpy as np
import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

# How numpy reads each dtype's bytes. numpy has no bfloat16 or float8, so those are read as integers
# of the same width and reinterpreted (tensor.view) as the torch dtype. BF16 goes through int16, not
# uint16: torch.from_numpy only accepts uint16 arrays since torch 2.3, and the bits are the same.
# The "<" says little-endian explicitly, whatever the host.
_NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<i2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
    "BOOL": "?", "F8_E4M3": "u1", "F8_E5M2": "u1",
}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TORCH_EXTENSIONS = (".bin", ".pt", ".pth")


# ----------------------------------------------------------------------------- safetensors

def read_safetensors_header(path):
    """Parse and check a .safetensors header. Returns (entries, metadata, data_start):
    entries = {name: dict(dtype=str, shape=list, data_offsets=[begin, end])}, metadata = the
    "__metadata__" dict (or {}), data_start = 8 + header length (file offset of the data section).
    Anything malformed raises ValueError naming the file, so a bad download fails here with a reason
    instead of later with garbage weights."""
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: not a safetensors file: it is {size} bytes long, shorter than the "
                         f"8-byte header length that starts every safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        # check against the file size *before* reading, so garbage can't make us allocate terabytes
        if 8 + header_len > size:
            raise ValueError(f"{path}: not a safetensors file (or cut short): its header length says "
                             f"{header_len} bytes but the file is only {size} bytes long")
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file: its header is JSON but not a JSON object "
                         f"(got {type(header).__name__})")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: the header's __metadata__ should be a JSON object, "
                         f"got {type(metadata).__name__}")
    data_start = 8 + header_len
    data_len = size - data_start
    entries = {}
    for name, entry in header.items():
        entries[name] = _check_entry(path, name, entry)

    needed = max((e["data_offsets"][1] for e in entries.values()), default=0)
    if needed > data_len:
        raise ValueError(f"{path}: the file is truncated: its tensors need {needed} bytes of data after "
                         f"the header but only {data_len} bytes are there (an interrupted download? "
                         f"delete the file and fetch it again)")
    return entries, metadata, data_start


def _is_int(x):
    return type(x) is int  # not isinstance: JSON true/false load as bools, which are ints to Python


def _check_entry(path, name, entry):
    """One header entry, checked: a known dtype, a shape of non-negative ints, and data_offsets that
    span exactly prod(shape) * itemsize bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"{where}: header entry should be an object with dtype, shape and "
                         f"data_offsets, got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where} has unknown dtype {dtype!r}; "
                         f"supported: {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where} has an invalid shape {shape!r} (should be a list of integers >= 0)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where} has data_offsets {offsets!r} out of range "
                         f"(should be [begin, end] with 0 <= begin <= end)")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{where}: shape {shape} of {dtype} is {nbytes} bytes but its data_offsets "
                         f"{offsets} span {offsets[1] - offsets[0]} bytes")
    return dict(dtype=dtype, shape=list(shape), data_offsets=list(offsets))


def read_safetensors(path, dtype=None):
    """All tensors of a .safetensors file as CPU tensors backed by a memory map of the file.
    dtype: if given, floating-point tensors are cast to it (integer and bool tensors are not)."""
    entries, _, data_start = read_safetensors_header(path)
    if not entries:
        return {}
    # Mode "c" (copy-on-write): the array is writable, which torch.from_numpy wants (it warns on a
    # read-only one), yet writes go to private copies of the pages and never reach the file. Each tensor
    # keeps a reference to its slice of the map, so the map stays open as long as any tensor lives.
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    state = {}
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        torch_dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        raw = mapped[data_start + begin:data_start + end]
        # The map starts page-aligned, so a tensor is aligned iff its file offset is. The reference
        # writer pads the header to keep tensors aligned, but the format does not require it, and a
        # misaligned view is slow or unsupported in places; a copy gets fresh, aligned memory.
        if (data_start + begin) % torch_dtype.itemsize:
            raw = np.array(raw)
        array = raw.view(_NUMPY_DTYPES[entry["dtype"]])
        if sys.byteorder == "big" and array.dtype.itemsize > 1:
            # the file is little-endian; a big-endian host needs the bytes swapped (this copies)
            array = array.astype(array.dtype.newbyteorder("="))
        tensor = torch.from_numpy(array)
        if tensor.dtype != torch_dtype:  # BF16 (read as int16) and float8 (read as uint8)
            tensor = tensor.view(torch_dtype)
        state[name] = _cast(tensor.reshape(entry["shape"]), dtype)
    return state


def _cast(tensor, dtype):
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(dtype)
    return tensor


# ----------------------------------------------------------------------------- PyTorch checkpoints

def read_torch_bin(path, dtype=None):
    """A state dict saved with torch.save (pytorch_model.bin and friends), on the CPU.
    weights_only=True: a .bin is a pickle, and only this mode refuses to run code hidden in one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    # Files from torch >= 1.6 are zip archives and can be memory-mapped like safetensors; the older
    # "legacy" format can't (torch.load refuses mmap=True for it), so it is read into memory.
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a pickle error, a truncated zip, an unsupported object...: all "unreadable"
        raise ValueError(f"{path}: could not read it as a PyTorch checkpoint "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of name -> tensor), "
                         f"got a {type(state).__name__}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"{path}: expected a state dict (a dict of name -> tensor), but these "
                         f"entries are not name -> tensor: {', '.join(map(repr, bad[:5]))}")
    return {k: _cast(v, dtype) for k, v in state.items()}


def read_weights(path, dtype=None):
    """One weight file, read according to its extension."""
    if path.endswith(".safetensors"):
        return read_safetensors(path, dtype)
    if path.endswith(TORCH_EXTENSIONS):
        return read_torch_bin(path, dtype)
    raise ValueError(f"{path}: unsupported weight file; supported extensions: "
                     f".safetensors, {', '.join(TORCH_EXTENSIONS)}")


# ----------------------------------------------------------------------------- model folders

def read_json(path):
    """A model folder's JSON file, read here for every reader of a folder (config.json, an index,
    tokenizer.py's tokenizer files); a broken one is a clear error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: bad JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_index(path):
    """The "weight_map" ({tensor name: shard file name}) of a sharded checkpoint's index file."""
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path}: not a valid index file: it needs a \"weight_map\" object "
                         f"of tensor name -> shard file name")
    for shard in set(weight_map.values()):
        # shards sit next to the index; refusing paths keeps a hostile index from reaching elsewhere
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{path}: shard {shard!r} in weight_map is not a plain file name")
    return weight_map


def find_weight_files(folder):
    """The files that hold a model folder's weights, as absolute paths: the first of WEIGHT_FILES that
    is present; for an index, [index] followed by the shards it names (unique, sorted)."""
    folder = os.path.abspath(folder)
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = sorted(set(read_index(path).values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{folder}: {name} names shard file(s) that are missing: "
                                    f"{', '.join(missing)} (an incomplete download?)")
        return [path] + [os.path.join(folder, s) for s in shards]
    raise FileNotFoundError(f"{folder}: no model weights found; expected one of: {', '.join(WEIGHT_FILES)}")


def read_folder(folder, dtype=None):
    """Every tensor of a model folder, all shards merged into one dict."""
    files = find_weight_files(folder)
    if len(files) == 1:
        return read_weights(files[0], dtype)
    index, shards = files[0], files[1:]
    weight_map = read_index(index)
    state = {}
    for shard in shards:
        tensors = read_weights(shard, dtype)
        expected = [k for k, v in weight_map.items() if v == os.path.basename(shard)]
        missing = [k for k in expected if k not in tensors]
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"{index} says {os.path.basename(shard)} holds {len(missing)} tensor(s) "
                             f"that it does not: {', '.join(missing[:5])}{more}")
        twice = [k for k in tensors if k in state]
        if twice:
            raise ValueError(f"{folder}: tensor(s) found in more than one shard: {', '.join(twice[:5])}")
        state.update(tensors)
    return state
