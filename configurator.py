"""
nanoGPT's configurator, made strict. A script's settings are its lowercase module globals of plain
types (train.py's, sample.py's); a config file is plain Python assignments (config/*.py) and
--key=value flags come after it, exactly as in nanoGPT, except that:
  - a key that does not exist -- in a flag *or* in a file -- is an error listing the valid keys
    (nanoGPT silently creates misspelled keys from config files);
  - a value must have the default's type (an int is accepted for a float);
  - a renamed key names its new spelling.

    defaults = settings(globals())                 # in a script, right after its settings
    cfg = parse_config(sys.argv[1:], defaults)     # a dict; raises ValueError saying what is wrong
"""

import ast
import os

RENAMED_KEYS = {"compile": "torch_compile", "input": "prompt_input"}   # they shadowed Python builtins


def settings(scope):
    """A script's settings: its lowercase module globals of plain types."""
    return {k: v for k, v in scope.items()
            if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def parse_config(argv, defaults):
    """Config files and --key=value flags, in order, applied to `defaults`. Returns the updated dict."""
    config = dict(defaults)

    def assign(key, value, source):
        if key not in defaults:
            if key in RENAMED_KEYS and RENAMED_KEYS[key] in defaults:
                raise ValueError(f"config key {key!r} in {source} was renamed: use {RENAMED_KEYS[key]!r}")
            raise ValueError(f"unknown config key {key!r} in {source}; valid keys: {', '.join(sorted(defaults))}")
        want = type(defaults[key])
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ValueError(f"{key} from {source} must be {want.__name__}, got {value!r} "
                             f"({type(value).__name__}); default is {defaults[key]!r}")
        config[key] = value

    for arg in argv:
        if not arg.startswith("--"):
            for key, value in read_config_file(arg).items():
                assign(key, value, arg)
            continue
        if "=" not in arg:
            raise ValueError(f"flag {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        if key in defaults and isinstance(defaults[key], str):
            value = text  # strings need no quotes: --init_from=gpt2
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"cannot read the value of {arg!r} (expected a Python literal)") from None
        assign(key, value, arg)
    return config


def read_config_file(path):
    """The assignments of a config file (plain Python, as in nanoGPT), names starting with _ left out."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found (flags look like --key=value)")
    scope = {}
    with open(path) as f:
        source = f.read()
    try:
        exec(source, {}, scope)
    except Exception as e:
        raise ValueError(f"config file {path} does not run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_")}
