"""
Tests for hub.py (downloading model repos and data files). No internet: each test starts its own small
HTTP server on 127.0.0.1 (a free port), serving files written under tmp_path in the hub's layout
/<repo_id>/resolve/main/<file>. The server supports Range requests, can cut a response short (to
test resuming) or answer with a given status, and records every request it gets. A few seconds.

    python -m pytest tests/test_hub.py -q
"""

import json
import os
import struct

import pytest

import hub
import tensorfile
from helpers import FakeHub, isolate_from_network


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    isolate_from_network(monkeypatch, tmp_path / "cache")


@pytest.fixture
def server(tmp_path):
    s = FakeHub(str(tmp_path / "served"))
    yield s
    s.close()


def safetensors_bytes(n):
    """A real (tiny) safetensors file of n float32 zeros, written by hand."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * n)


def add_repo(server, repo_id, files):
    for name, data in files.items():
        server.add(f"/{repo_id}/resolve/main/{name}", data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def listing(folder):
    return sorted(os.listdir(folder))


def test_fetch_model_then_cached(server, monkeypatch, tmp_path):
    files = {"config.json": b'{"n_layer": 2}', "tokenizer.json": b'{"model": {}}',
             "model.safetensors": safetensors_bytes(1000)}
    add_repo(server, "org/tiny", files)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)  # both defaults: endpoint and cache from the env
    folder = hub.fetch_model("org/tiny")
    assert folder == os.path.join(str(tmp_path / "cache"), "org", "tiny")
    assert listing(folder) == sorted(files)  # no .part left, nothing for the files the repo lacks
    for name, data in files.items():
        assert read(os.path.join(folder, name)) == data
    assert "/org/tiny/resolve/main/tokenizer_config.json" in server.paths()  # asked, got 404, skipped
    assert "/org/tiny/resolve/main/pytorch_model.bin" not in server.paths()

    server.requests.clear()
    assert hub.fetch_model("org/tiny") == folder
    assert server.requests == []


def test_fetch_sharded_model(server, tmp_path):
    shards = {"model-00001-of-00002.safetensors": safetensors_bytes(10),
              "model-00002-of-00002.safetensors": safetensors_bytes(20)}
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    files = {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(), **shards}
    add_repo(server, "org/sharded", files)
    folder = hub.fetch_model("org/sharded", cache_dir=str(tmp_path / "elsewhere"), endpoint=server.endpoint)
    assert folder == str(tmp_path / "elsewhere" / "org" / "sharded")
    assert listing(folder) == sorted(files)
    for name, data in files.items():
        assert read(os.path.join(folder, name)) == data
    server.requests.clear()
    hub.fetch_model("org/sharded", cache_dir=str(tmp_path / "elsewhere"), endpoint=server.endpoint)
    assert server.requests == []


def test_fetch_bin_only_model(server):
    files = {"config.json": b"{}", "vocab.json": b'{"a": 0}', "merges.txt": b"#version\n",
             "pytorch_model.bin": os.urandom(3000)}
    add_repo(server, "gpt2", files)  # an id without an org, like the original GPT-2 repos
    folder = hub.fetch_model("gpt2", endpoint=server.endpoint)
    assert listing(folder) == sorted(files)
    for name, data in files.items():
        assert read(os.path.join(folder, name)) == data
    assert server.paths().index("/gpt2/resolve/main/model.safetensors") < \
        server.paths().index("/gpt2/resolve/main/model.safetensors.index.json") < \
        server.paths().index("/gpt2/resolve/main/pytorch_model.bin")


def test_fetch_sharded_bin_model(server, tmp_path):
    """An older repo with only pytorch_model.bin shards: every kind the loader reads is asked for in
    the loader's order (tensorfile.WEIGHT_FILES), the index found last, its shards fetched."""
    shards = {"pytorch_model-00001-of-00002.bin": os.urandom(500), "pytorch_model-00002-of-00002.bin": os.urandom(700)}
    index = {"metadata": {}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                            "b": "pytorch_model-00002-of-00002.bin"}}
    files = {"config.json": b"{}", "pytorch_model.bin.index.json": json.dumps(index).encode(), **shards}
    add_repo(server, "org/oldbin", files)
    folder = hub.fetch_model("org/oldbin", cache_dir=str(tmp_path), endpoint=server.endpoint)
    assert listing(folder) == sorted(files)
    asked = [p.rsplit("/", 1)[1] for p in server.paths()]
    kinds = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    assert [a for a in asked if a in kinds] == kinds
    assert tensorfile.find_weight_files(folder)[1:] == [os.path.join(folder, s) for s in sorted(shards)]


def test_interrupted_download_resumes(server):
    weights = os.urandom(100_000)
    add_repo(server, "org/flaky", {"config.json": b"{}", "model.safetensors": weights})
    server.cut.add("/org/flaky/resolve/main/model.safetensors")
    with pytest.raises(OSError, match="was cut.*rerunning resumes it"):
        hub.fetch_model("org/flaky", endpoint=server.endpoint)
    folder = os.path.join(os.environ["PESC_CACHE"], "org", "flaky")
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    part = os.path.join(folder, "model.safetensors.part")
    assert read(part) == weights[:50_000]

    server.requests.clear()
    hub.fetch_model("org/flaky", endpoint=server.endpoint)
    assert read(os.path.join(folder, "model.safetensors")) == weights
    assert not os.path.exists(part)
    ranges = [h.get("Range") for p, h in server.requests if p.endswith("/model.safetensors")]
    assert ranges == ["bytes=50000-"]
    assert "/org/flaky/resolve/main/config.json" not in server.paths()  # already complete: not fetched


def test_server_ignoring_range_starts_over(server, tmp_path):
    data = os.urandom(5000)
    server.add("/files/data.bin", data)
    server.ignore_range = True
    dest = str(tmp_path / "out" / "data.bin")
    os.makedirs(os.path.dirname(dest))
    with open(dest + ".part", "wb") as f:
        f.write(b"stale bytes from another file")
    assert hub.download(f"{server.endpoint}/files/data.bin", dest) == dest
    assert read(dest) == data
    assert server.requests[0][1].get("Range") == "bytes=29-"  # it asked, got 200, and started over


def test_download_of_existing_file_makes_no_request(server, tmp_path):
    dest = tmp_path / "here.bin"
    dest.write_bytes(b"complete")
    assert hub.download(f"{server.endpoint}/files/here.bin", str(dest)) == str(dest)
    assert server.requests == [] and dest.read_bytes() == b"complete"


def test_offline(dead_endpoint, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        hub.fetch_model("org/tiny", endpoint=dead_endpoint)
    message = str(e.value)
    folder = os.path.join(str(tmp_path / "cache"), "org", "tiny")
    for part in (folder, f"{dead_endpoint}/org/tiny", f"{dead_endpoint}/org/tiny/resolve/main/config.json",
                 "config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin",
                 "local model folder instead of the repo id"):
        assert part in message, part
    assert not os.path.exists(os.path.join(folder, "config.json"))


@pytest.mark.parametrize("code", [401, 403])
def test_gated_repo(server, code):
    add_repo(server, "meta/gated", {"config.json": b"{}"})
    server.status["/meta/gated/resolve/main/config.json"] = code
    with pytest.raises(PermissionError, match="HF_TOKEN") as e:
        hub.fetch_model("meta/gated", endpoint=server.endpoint)
    assert "gated" in str(e.value) and "license" in str(e.value)


def test_missing_repo(server):
    with pytest.raises(FileNotFoundError, match="no such repo"):
        hub.fetch_model("org/nothing", endpoint=server.endpoint)


def test_repo_without_weights(server):
    add_repo(server, "org/empty", {"config.json": b"{}"})
    with pytest.raises(FileNotFoundError, match="none of the weight files"):
        hub.fetch_model("org/empty", endpoint=server.endpoint)


def test_token_is_sent_to_the_hub_only(server, tmp_path, monkeypatch):
    add_repo(server, "meta/gated", {"config.json": b"{}", "model.safetensors": safetensors_bytes(4)})
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.fetch_model("meta/gated", endpoint=server.endpoint)  # endpoint given as an argument
    assert server.requests and all(h.get("Authorization") == "Bearer hf_secret" for _, h in server.requests)

    server.requests.clear()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)  # and the endpoint from the environment
    hub.download(f"{server.endpoint}/meta/gated/resolve/main/model.safetensors", str(tmp_path / "w"))
    assert server.requests[0][1].get("Authorization") == "Bearer hf_secret"

    other = FakeHub(str(tmp_path / "other"))  # another host (port) is not the hub: no token
    try:
        other.add("/data/x.json", b"[]")
        hub.fetch_dataset(f"{other.endpoint}/data/x.json")
        assert other.requests and "Authorization" not in other.requests[0][1]

        # the hub redirects file downloads to a CDN; the token must not follow the redirect there
        other.add("/cdn/blob", b"weights")
        server.redirect["/files/redirected"] = f"{other.endpoint}/cdn/blob"
        other.requests.clear()
        hub.download(f"{server.endpoint}/files/redirected", str(tmp_path / "r"))
        assert read(str(tmp_path / "r")) == b"weights"
        assert server.requests[-1][1].get("Authorization") == "Bearer hf_secret"
        assert [p for p, _ in other.requests] == ["/cdn/blob"] and "Authorization" not in other.requests[0][1]
    finally:
        other.close()


def test_lookalike_host_gets_no_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub._auth_headers("https://huggingface.co/gpt2/resolve/main/x", hub.hub_endpoint())
    assert not hub._auth_headers("https://huggingface.co.example.org/x", hub.hub_endpoint())


def test_defaults(monkeypatch):
    monkeypatch.delenv("PESC_CACHE")
    assert hub.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "pesc")
    assert hub.hub_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("PESC_CACHE", "/somewhere")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    assert (hub.default_cache_dir(), hub.hub_endpoint()) == ("/somewhere", "https://mirror.example")
    assert hub.is_url("https://x/y") and hub.is_url("http://x") and not hub.is_url("data/x.json")


# ----------------------------------------------------------------------------- data files

def test_fetch_dataset_by_url_and_by_name(server, monkeypatch, tmp_path):
    data = json.dumps([{"instruction": "hi", "output": "hello"}]).encode()
    server.add("/tatsu/main/alpaca_data.json", data)
    url = f"{server.endpoint}/tatsu/main/alpaca_data.json"
    path = hub.fetch_dataset(url)
    assert path == os.path.join(str(tmp_path / "cache"), "data", "alpaca_data.json")
    assert read(path) == data
    assert len(server.requests) == 1

    monkeypatch.setitem(hub.DATASETS, "alpaca", url)
    assert hub.fetch_dataset("alpaca") == path  # same file, already there: no request
    assert hub.fetch_dataset(url) == path
    assert len(server.requests) == 1

    other = hub.fetch_dataset("alpaca", cache_dir=str(tmp_path / "c2"))
    assert other == str(tmp_path / "c2" / "data" / "alpaca_data.json") and read(other) == data
    assert len(server.requests) == 2


def test_fetch_dataset_offline(dead_endpoint, tmp_path):
    url = f"{dead_endpoint}/some/data.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        hub.fetch_dataset(url)
    path = os.path.join(str(tmp_path / "cache"), "data", "data.jsonl")
    assert url in str(e.value) and path in str(e.value)
    assert not os.path.exists(path)


def test_fetch_dataset_local_paths(tmp_path):
    local = tmp_path / "mine.json"
    local.write_text("[]")
    assert hub.fetch_dataset(str(local)) == str(local)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        hub.fetch_dataset(str(tmp_path / "nope.json"))
