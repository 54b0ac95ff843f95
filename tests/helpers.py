"""Helpers several test files share (test-side tools, not references: each test still checks
against its own independent formula, loop or hand-computed value)."""

import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


@torch.no_grad()
def order_one_weights(model, std):
    """Weights of order one in place (the default 0.02 init gives logits of order 0.1, which would
    make a 1e-5 tolerance weak): matrices N(0, std), norms' gains 1 + N(0, 0.1), biases N(0, 0.1)."""
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, std)
        elif "ln" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1)
        else:
            p.normal_(0.0, 0.1)
    return model


@torch.no_grad()
def spread_routers(model, idx, seed=0, logit_std=3.0):
    """Router weights that spread the tokens of idx over the experts. The router's own init gives
    near-tied logits, and even a large random W_r often leaves an expert without a single token,
    because the residual stream has a big component shared by all tokens. So: random directions
    orthogonal to the mean of each MoE layer's input, scaled to logits of std logit_std."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0].flatten(0, -2)))
             for layer in model.moe_layers()]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    g = torch.Generator().manual_seed(seed)
    for layer in model.moe_layers():
        h = inputs[layer].float()                                          # (N, d)
        mean = h.mean(dim=0)
        mean = mean / mean.norm()                                          # (d,)
        w = torch.randn(layer.n_experts, h.size(1), generator=g)           # (E, d)
        w = w - (w @ mean)[:, None] * mean[None, :]                        # w . mean = 0
        w = w * (logit_std / (h @ w.t()).std())
        layer.router.gate.weight.copy_(w.to(layer.router.gate.weight.dtype))


# -----------------------------------------------------------------------------
# a Hugging Face hub on 127.0.0.1 (tests never reach any other address)

class FakeHub:
    """A file server on 127.0.0.1. Knobs: status[path] = code to answer instead of the file;
    cut = paths whose next response is cut after half its bytes; ignore_range = answer Range requests
    with the whole file (200); redirect[path] = URL to send a 302 to. requests = [(path, headers)]."""

    def __init__(self, root):
        self.root = root
        self.requests = []
        self.status, self.redirect = {}, {}
        self.cut = set()
        self.ignore_range = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs=dict(poll_interval=0.05),
                                       daemon=True)
        self.thread.start()

    def add(self, path, data):
        """Serve `data` (bytes) at URL path `path`."""
        file = os.path.join(self.root, *path.strip("/").split("/"))
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(file, "wb") as f:
            f.write(data)

    def paths(self):
        return [path for path, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def handler(self):
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.unquote(self.path)
                hub_.requests.append((path, dict(self.headers)))
                if path in hub_.status:
                    return self.send_error(hub_.status[path])
                if path in hub_.redirect:
                    self.send_response(302)
                    self.send_header("Location", hub_.redirect[path])
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                file = os.path.join(hub_.root, *path.strip("/").split("/"))
                if ".." in path.split("/") or not os.path.isfile(file):
                    return self.send_error(404)
                with open(file, "rb") as f:
                    data = f.read()
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and not hub_.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in hub_.cut:  # promise every byte, send half, hang up
                    hub_.cut.discard(path)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler


def isolate_from_network(monkeypatch, cache_dir):
    """No proxy (requests must go straight to 127.0.0.1), no token, no hub endpoint, a private cache."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("PESC_CACHE", str(cache_dir))
