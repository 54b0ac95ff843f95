"""
requirements.txt states the real minimum torch: every version-gated API the project calls is at
least as old as the stated minimum, and the build tool of kernels.cu is listed.

    python -m pytest tests/test_requirements.py -q
"""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# an API the code uses -> the torch release that introduced it (from the torch release notes)
INTRODUCED = {
    "torch.get_autocast_dtype": (2, 4),
    "torch.is_autocast_enabled(": (2, 4),        # the form with a device-type argument
    "fused=device_type in (\"cuda\", \"cpu\")": (2, 4),   # fused AdamW on the CPU
    "torch.compiler.is_compiling": (2, 3),
    "nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=": (2, 1),
    "load_state_dict(state, assign=True)": (2, 1),
    "mmap=True": (2, 1),
    "torch.float8_e4m3fn": (2, 1),
}
OPTIONAL = {"F.grouped_mm": (2, 9)}             # used only where present (moe.grouped_mm_works)


def stated_minimum():
    text = open(os.path.join(ROOT, "requirements.txt")).read()
    m = re.search(r"^torch>=(\d+)\.(\d+)", text, re.M)
    assert m, "requirements.txt must state a minimum torch"
    return int(m.group(1)), int(m.group(2))


def sources():
    return "\n".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py")))


def test_no_api_newer_than_the_stated_minimum():
    code, minimum = sources(), stated_minimum()
    used = {api: v for api, v in INTRODUCED.items() if api in code}
    assert "torch.get_autocast_dtype" in used and "torch.compiler.is_compiling" in used   # the table is live
    too_new = {api: v for api, v in used.items() if v > minimum}
    assert not too_new, f"requirements.txt says torch>={minimum}, but the code uses {too_new}"
    assert max(used.values()) == minimum, "the stated minimum is older than it needs to be stated"


def test_optional_newer_apis_are_guarded():
    code = open(os.path.join(ROOT, "moe.py")).read()
    assert "F.grouped_mm" in code and 'hasattr(F, "grouped_mm")' in code


def test_ninja_is_a_requirement():
    assert re.search(r"^ninja\b", open(os.path.join(ROOT, "requirements.txt")).read(), re.M)
