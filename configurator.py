"""
Configuration and the few helpers every script shares. A leaf: it imports no module of this project, so any
file may import it (nanoGPT's configurator, grown up a little).

    cfg = configure(defaults, sys.argv[1:], sources)   # config files, --key=value overrides, --help
    device = resolve_device(cfg['device'])              # auto | cpu | cuda | cuda:N, refused if absent
    dtype, ctx = precision(cfg['dtype'], device)        # bf16 autocast where the hardware has it
    torch.manual_seed(seed_of(seed, step, index))       # per-step randomness from where the run is
    save_atomic(obj, path)                              # temp file + rename: never half a file

Knobs are plain module-level values (ints, floats, bools, strings), each with a trailing comment that says
what it does; `--help` prints every knob a script reads with its default and that comment.
"""

import ast
import json
import math
import os
import re
import sys
from contextlib import nullcontext

import numpy as np
import torch


def fail(message):
    """A user's mistake: one sentence on stderr and exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


# -----------------------------------------------------------------------------
# knobs: defaults, comments, --help, config files and --key=value


def knobs(namespace):
    """The knobs of a namespace (a module's vars() or a dict): its ints, floats, bools and strings, except
    private (_x) and constant (UPPER_CASE) names."""
    return {k: v for k, v in namespace.items()
            if isinstance(v, (int, float, bool, str)) and not k.startswith('_') and not k.isupper()}


# `name = value  # comment`, `name: type = value  # comment` (dataclass fields) or `name=value,  # comment`
_KNOB_LINE = re.compile(r"^\s*(\w+)\s*(?::[^=#]*)?=(?!=)[^#]*#\s?(.*)$")


def comments(path):
    """{knob: its trailing comment} read from a source file."""
    with open(path, encoding='utf-8') as f:
        return {m[1]: m[2].strip() for m in map(_KNOB_LINE.match, f) if m}


def print_help(usage, sections):
    """sections: [(title, defaults, comments)]; one line per knob: --key=default  comment."""
    print(usage.strip() + '\n')
    for title, defaults, notes in sections:
        print(f"{title}:")
        for k, v in defaults.items():
            flag = f"--{k}={v!r}"
            print(f"  {flag:<42} {notes.get(k, '')}".rstrip())
        print()


def configure(defaults, argv, usage='', sections=None):
    """nanoGPT's configurator, with errors instead of surprises. Config files are python files that assign
    known keys; --key=value is parsed as a python literal (or kept as a string) and must match the default's
    type. --help (or -h) prints the knobs (sections: [(title, keys, source file)]) and exits 0."""
    if '--help' in argv or '-h' in argv:
        print_help(usage, [(title, {k: defaults[k] for k in keys}, comments(src)) for title, keys, src in
                           (sections or [('knobs', list(defaults), sys.argv[0])])])
        raise SystemExit(0)
    cfg = dict(defaults)

    def set_key(key, value, where):
        if key not in cfg:
            fail(f"unknown config key '{key}' ({where}); --help lists them")
        old = cfg[key]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(old):
            fail(f"config key '{key}' wants {type(old).__name__}, got {value!r} ({where})")
        cfg[key] = value

    for arg in argv:
        if arg.startswith('--'):
            key, eq, val = arg[2:].partition('=')
            if not eq:
                fail(f"flag {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                value = val
            if isinstance(cfg.get(key), str) and not isinstance(value, str):
                value = val  # a string knob takes the text as written: --t_grid=0.5 or --t_grid=0.1,0.9
            set_key(key, value, arg)
            continue
        if not os.path.isfile(arg):
            fail(f"config file {arg!r} does not exist")
        scope = {}
        try:
            with open(arg, encoding='utf-8') as f:
                exec(compile(f.read(), arg, 'exec'), {}, scope)
        except SyntaxError as e:
            fail(f"config file {arg} has a syntax error on line {e.lineno}: {e.msg}")
        except Exception as e:  # a config file is code: whatever it raises is the file's fault
            fail(f"config file {arg} failed: {type(e).__name__}: {e}")
        for key, value in scope.items():
            if not key.startswith('_'):
                set_key(key, value, arg)
    return cfg


# -----------------------------------------------------------------------------
# device, precision, seeds


def resolve_device(name):
    """'auto' -> cuda if there is one, else cpu; an explicit cuda without a GPU is refused."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if not re.fullmatch(r'cpu|cuda(:\d+)?', name):
        fail(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={name} but this machine has no CUDA GPU (use --device=cpu or auto)")
    return torch.device(name)


def native_bf16_cpu():
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Elsewhere bf16 matmuls are emulated and
    slower than fp32. (torch.cpu's probes are private; a torch without them counts as no.)"""
    probes = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def precision(dtype, device):
    """-> (dtype name, context to run the forward in): bf16 autocast (fp32 weights, optimizer and loss
    reductions) or plain fp32. 'auto' = bf16 on CUDA and on CPUs with native bf16 (the default step's matmuls
    are 60% of its time in fp32; bf16 halves them: docs/speed.md), fp32 on other CPUs."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' or native_bf16_cpu() else 'float32'
    if dtype not in ('float32', 'bfloat16'):
        fail(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return dtype, torch.autocast(device.type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()


def seed_of(*ints):
    """One 63-bit seed from several integers (seed, step, micro-batch): every step's randomness is a function
    of where it is, so nothing but the step has to be saved to resume exactly."""
    return int(np.random.SeedSequence(list(ints)).generate_state(2, np.uint64)[0] >> np.uint64(1))


# -----------------------------------------------------------------------------
# files


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash mid-write leaves the previous file intact. The temp name
    is per process (runs sharing a cache_dir may build the same RAE at once); remove_orphans cleans up after
    a killed one."""
    tmp = f'{path}.{os.getpid()}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def remove_orphans(folder, pattern):
    """Delete temp files `*.<pid>.tmp*` matching pattern whose process is gone (a killed build's); a live
    process's are left alone. Returns the names removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = re.search(r'\.(\d+)\.tmp', name)
        if not (m and re.search(pattern, name)):
            continue
        try:
            os.kill(int(m[1]), 0)
            continue            # still running: a concurrent build
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's live process
            continue
        os.remove(os.path.join(folder, name))
        removed.append(name)
    return removed


def finite_or_null(obj):
    """obj with every non-finite float (in nested dicts and lists too) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def json_line(entry):
    """Strict JSON (no bare NaN / Infinity, which strict readers reject): non-finite floats become null."""
    return json.dumps(finite_or_null(entry), allow_nan=False)
