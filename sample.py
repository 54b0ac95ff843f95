"""
Sample from a checkpoint written by train.py (any method, any base), with the same prompt template.

    python sample.py --prompt="Reverse the word: lemon"
    python sample.py --prompt_file=my_prompt.txt --temperature=0.8 --top_k=50 --seed=7
    python sample.py --prompt="What does this Python code print? print(3 * 4)" --show_experts=True

Generation uses the KV cache (one prefill over the prompt, then one token per step). --show_experts=True
prints, for every generated token, the experts it was routed to in each MoE layer: a token is routed
when it is fed back in as input, so the finished sequence is run through the model once more and
routing.indices (see model.py, Routing) gives each layer's choices at the generated positions.
"""

import os
import sys

import torch

from checkpoint import build_model, read_checkpoint
from configurator import parse_config, settings
from data.instruct import decode_response, encode_prompt, format_prompt
from tokenizer import load_tokenizer

ckpt = "out/ckpt.pt"
prompt = ""                  # the instruction; the template is applied unless raw=True
prompt_file = ""             # or read the instruction from this file
prompt_input = ""            # optional input line of the template (data/instruct.py, format_prompt)
raw = False                  # feed the prompt as is, without the template
num_samples = 1
max_new_tokens = 64
temperature = 0.8            # 0 = greedy
top_k = 200
seed = 1337
show_experts = False
device = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULTS = settings(globals())


@torch.no_grad()
def expert_table(model, tok, idx, n_prompt):
    """Rows of (token text, [experts per MoE layer]) for the generated positions of idx (1, T)."""
    bs = model.config.block_size
    _, _, routing = model(idx[:, -bs:])
    offset = max(0, idx.size(1) - bs)
    rows = []
    for t in range(max(n_prompt, offset), idx.size(1)):
        choices = routing.indices[:, t - offset].tolist()      # (layers, k)
        rows.append((tok.token_text(idx[0, t].item()), choices))
    return rows


def main(argv):
    cfg = parse_config(argv, DEFAULTS)
    if cfg["prompt_file"]:
        if not os.path.isfile(cfg["prompt_file"]):
            raise FileNotFoundError(f"prompt_file {cfg['prompt_file']} does not exist")
        with open(cfg["prompt_file"]) as f:
            cfg["prompt"] = f.read().strip()
    if not cfg["prompt"]:
        raise ValueError("give a prompt: --prompt=\"...\" or --prompt_file=path")
    if cfg["temperature"] < 0 or cfg["max_new_tokens"] <= 0 or cfg["top_k"] <= 0 or cfg["num_samples"] <= 0:
        raise ValueError("need temperature >= 0 and positive max_new_tokens, top_k, num_samples")
    checkpoint = read_checkpoint(cfg["ckpt"])
    model = build_model(checkpoint, cfg["ckpt"]).to(cfg["device"]).eval()
    tok = load_tokenizer(checkpoint["tokenizer"])
    if cfg["show_experts"] and not model.moe_layers():
        raise ValueError(f"{cfg['ckpt']} has no MoE layers (method {checkpoint.get('method')!r}): no experts to show")
    text = cfg["prompt"] if cfg["raw"] else format_prompt(cfg["prompt"], cfg["prompt_input"])
    ids = encode_prompt(tok, text)
    idx = torch.tensor([ids], dtype=torch.long, device=cfg["device"])
    torch.manual_seed(cfg["seed"])
    outputs = []
    for _ in range(cfg["num_samples"]):
        out = model.generate(idx, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"],
                             eos_id=tok.eos_id, n_vocab=tok.n_vocab)
        answer = decode_response(tok, out[0, len(ids):].tolist())
        outputs.append(answer)
        print(text + answer)
        if cfg["show_experts"]:
            print(f"experts per generated token (top-{model.moe_layers()[0].top_k}, one column per MoE layer):")
            for token, choices in expert_table(model, tok, out, len(ids)):
                print(f"  {token!r:>8}  " + "  ".join(",".join(map(str, c)) for c in choices))
        print("-" * 60)
    return outputs


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
