"""
Downloading model files from the Hugging Face hub, and data files, with urllib only (no extra package).

    from hub import fetch_model, fetch_dataset
    folder = fetch_model("gpt2")      # ~/.cache/pesc/gpt2/: config.json, tokenizer.json, model.safetensors
    path = fetch_dataset("alpaca")    # ~/.cache/pesc/data/alpaca_data.json

A file under its real name is always complete: downloads go to <name>.part and are renamed at the end,
so anything already in the cache is used as is and a second call makes no network access at all. An
interrupted download leaves the .part behind, and the next call resumes it with an HTTP Range request.

The hub serves a repo's files at <endpoint>/<repo_id>/resolve/<revision>/<file>. Environment:
    PESC_CACHE     where files go (default ~/.cache/pesc)
    HF_ENDPOINT    the hub (default https://huggingface.co), e.g. a mirror
    HF_TOKEN       access token, sent to the hub only; needed for gated repos (e.g. Llama), whose
                   license you must first accept on the repo's page

Offline? Errors say which files to download elsewhere and where to put them; or pass a local folder.

Tests: python -m pytest tests/test_hub.py -q   (they serve files from a local HTTP server on 127.0.0.1)
"""

import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

import tensorfile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")
DATASETS = {"alpaca": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"}

# What "the network is not there" looks like: urlopen wraps DNS failures and refused connections in
# URLError, but a timeout while waiting for the response arrives bare. HTTPError is a URLError too;
# callers catch it first, since it means the server answered.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, socket.herror)


def default_cache_dir():
    return os.environ.get("PESC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pesc")


def hub_endpoint():
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def is_url(s):
    return isinstance(s, str) and s.startswith(("http://", "https://"))


def _under(url, endpoint):
    # "https://huggingface.co.evil.example/" starts with "https://huggingface.co" too; compare up to a "/"
    endpoint = endpoint.rstrip("/")
    return url == endpoint or url.startswith(endpoint + "/")


def _auth_headers(url, endpoint):
    token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token and _under(url, endpoint) else {}


class _RedirectKeepingTokenHome(urllib.request.HTTPRedirectHandler):
    """urllib forwards every header on a redirect. The hub answers a weight file request with a
    redirect to a CDN (a signed URL on another host): the token must not go there, and signed URLs
    may reject a request that carries a second credential."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        host = urllib.parse.urlsplit(req.full_url).netloc
        if new is not None and urllib.parse.urlsplit(newurl).netloc != host:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_RedirectKeepingTokenHome)


def download(url, dest, desc=None, timeout=30, headers=None):
    """Download url to dest (parent folders created) and return dest; if dest exists, return at once.
    Resumes a previous attempt's dest + ".part". headers: extra request headers (fetch_model passes
    the token for a hub endpoint given as an argument). HTTP errors propagate as HTTPError."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    request_headers = {**_auth_headers(url, hub_endpoint()), **(headers or {})}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    try:
        response = _opener.open(urllib.request.Request(url, headers=request_headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # "range not satisfiable": the .part doesn't fit the file; start over
            e.close()
            os.remove(part)
            return download(url, dest, desc, timeout, headers)
        raise
    with response:
        # 206 = the server honours the range: append. 200 = it sent the whole file: start over.
        if not (offset and response.status == 206):
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done = offset
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=desc or os.path.basename(dest)) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as e:  # a reset, a timeout, IncompleteRead
                    raise OSError(f"download of {url} was cut after {done} bytes ({type(e).__name__}: "
                                  f"{e}); the partial file is kept at {part} and rerunning resumes it") from e
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    # urllib does not always notice a connection closed before Content-Length bytes came; we do
    if total is not None and done != total:
        raise OSError(f"download of {url} was cut: got {done} of {total} bytes; the partial file is "
                      f"kept at {part} and rerunning resumes it")
    os.replace(part, dest)  # atomic: dest appears only once complete
    return dest


# ----------------------------------------------------------------------------- models

WEIGHTS_HINT = ("model.safetensors (or model.safetensors.index.json and the shards it names, "
                "or pytorch_model.bin, or pytorch_model.bin.index.json and its shards)")


def fetch_model(repo_id, cache_dir=None, endpoint=None, revision="main"):
    """A hub model repo's config, tokenizer files and weights, in a local folder (returned):
    cache_dir/<org>/<name>. A folder that already has config.json and its weights is used with no
    network access. (The folder does not depend on revision: one revision per repo in the cache.)"""
    parts = repo_id.split("/")
    if not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{repo_id!r} is not a hub repo id (like 'gpt2' or 'org/name')")
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    folder = os.path.join(cache_dir or default_cache_dir(), *parts)
    if os.path.isfile(os.path.join(folder, "config.json")):
        try:
            tensorfile.find_weight_files(folder)
            return folder
        except (FileNotFoundError, ValueError):
            pass  # weights missing or incomplete: fetch what's missing below (complete files are kept)

    repo_url = f"{endpoint}/{repo_id}"
    url = None  # the URL in flight, named in error messages

    def get(name, optional=False):
        """Download one file of the repo; False if optional and the repo has no such file (404)."""
        nonlocal url
        url = f"{repo_url}/resolve/{revision}/{name}"
        try:
            download(url, os.path.join(folder, name), desc=name, headers=_auth_headers(url, endpoint))
            return True
        except urllib.error.HTTPError as e:
            e.close()  # its body (an error page) is not needed; the status says it all
            if e.code == 404 and optional:
                return False
            raise

    try:
        fetch_repo_files(get, folder, repo_url, revision, endpoint)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise PermissionError(
                f"{url} answered HTTP {e.code}: the repo {repo_id} may be gated or private (the hub "
                f"also answers 401 for a repo that does not exist). For a gated model, accept its license "
                f"on {repo_url} while logged in, create an access token (hub settings, 'Access Tokens'), "
                f"and set HF_TOKEN to it.") from None
        raise
    except NETWORK_ERRORS as e:
        reason = getattr(e, "reason", e)
        raise FileNotFoundError(
            f"Could not download model {repo_id}: {url} could not be reached ({reason}). On a machine "
            f"with internet, download config.json, the tokenizer files it has ({', '.join(TOKENIZER_FILES)}) "
            f"and its weights, {WEIGHTS_HINT}, from {repo_url} and put them in {folder}{os.sep}, or pass "
            f"a local model folder instead of the repo id.") from None
    return folder


def fetch_repo_files(get, folder, repo_url, revision, endpoint):
    """config.json, the tokenizer files the repo has, and the first kind of weights it has."""
    try:
        get("config.json")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(
                f"{repo_url} has no config.json at revision {revision!r}: there is no such repo (or it "
                f"is private, or the revision does not exist). Check the name on {endpoint}, or pass "
                f"a local model folder instead of a repo id.") from None
        raise
    for name in TOKENIZER_FILES:
        get(name, optional=True)  # models differ in which of these they have
    for name in tensorfile.WEIGHT_FILES:   # the loader's order: the first kind the repo has is the one it reads
        if get(name, optional=True):
            if name.endswith(".index.json"):
                for shard in sorted(set(tensorfile.read_index(os.path.join(folder, name)).values())):
                    get(shard)
            return
    raise FileNotFoundError(f"{repo_url} has none of the weight files this project reads: {WEIGHTS_HINT}.")


# ----------------------------------------------------------------------------- data files

def fetch_dataset(name_or_url, cache_dir=None):
    """A data file: a name from DATASETS or an http(s) URL is downloaded once, to
    cache_dir/data/<file name from the URL>, and that path returned; anything else is taken as a local
    path and returned if it exists."""
    url = DATASETS.get(name_or_url, name_or_url)
    if not is_url(url):
        if os.path.exists(url):
            return url
        raise FileNotFoundError(f"{url}: no such file (and not a URL or one of the known data sets: "
                                f"{', '.join(DATASETS)})")
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if not name or name in (".", ".."):
        raise ValueError(f"{url}: can't tell a file name from this URL (it should end with one)")
    path = os.path.join(cache_dir or default_cache_dir(), "data", name)
    try:
        return download(url, path)
    except urllib.error.HTTPError:
        raise
    except NETWORK_ERRORS as e:
        reason = getattr(e, "reason", e)
        raise FileNotFoundError(f"Could not download {url} ({reason}). On a machine with internet, download "
                                f"it and put it at {path}, or pass the path of a local copy.") from None
