"""Shared test helpers and fixtures (pytest loads this file first). Tests marked `slow` start subprocesses or
train for a while: `python -m pytest -q -m "not slow"` is the quick edit-test loop (under a minute on 2 cores),
`python -m pytest -q` the whole suite (what CI runs)."""

import contextlib
import importlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import documents
import tokenizer
from model import ModelConfig
from moe import MoE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: scripts run from there


# -----------------------------------------------------------------------------
# packed batches and tiny models


def random_docs(rng, n_latent, d_latent, n_docs):
    """Random documents mixing text runs and visual blocks, with random latents."""
    docs = []
    for _ in range(n_docs):
        segs = []
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                segs.append(''.join(rng.choice(list('abc xyz.')) for _ in range(rng.integers(1, 12))))
            else:
                # latents travel as float16: draw values it holds exactly
                segs.append(documents.Visual(None, bool(rng.random() < 0.5), torch.randn(n_latent, d_latent).half().float()))
        docs.append(segs)
    return docs


def random_batch(seed=0, B=3, T=64, n_latent=4, d_latent=6):
    """(tokenizer, rows of documents, their packed Batch): byte tokens, 4 latents of 6 dims per picture."""
    rng = np.random.default_rng(seed)
    tok = tokenizer.Tokenizer()
    rows = []
    for _ in range(B):
        row, used = [], 0
        for d in random_docs(rng, n_latent, d_latent, 8):
            n = documents.doc_length(d, tok, n_latent)
            if used + n <= T:
                row.append(d)
                used += n
        rows.append(row)
    return tok, rows, data.pack(rows, tok, T, n_latent, d_latent)


def tiny_config(**kw):
    base = dict(vocab_size=262, block_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                d_latent=6, n_latent=4, attn='sdpa', shift=0.0)
    base.update(kw)
    return ModelConfig(**base)


# -----------------------------------------------------------------------------
# MoE layers (test_moe.py, test_cuda.py)


def make_moe(shared, dispatch, E=8, top_k=3, D=16, Fh=8, seed=0):
    """A small layer whose router has real preferences and never picks the last expert (so one slice is
    empty and the others are unequal)."""
    torch.manual_seed(seed)
    m = MoE(D, Fh, E, top_k, shared=shared, dispatch=dispatch)
    with torch.no_grad():
        m.router.weight.normal_(std=0.5)
        m.router.weight[-1] = -1.0  # inputs below have mean +1: expert E-1 loses every token
    return m


def moe_inputs(D=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 13, D, generator=g) + 1.0).requires_grad_()
    modality = torch.randint(0, 2, (2, 13), generator=g)
    return x, modality


def value_and_grads(fn, m, x, g):
    y = fn()
    params = [x, *m.parameters()]
    return y, torch.autograd.grad((y.float() * g).sum(), params, allow_unused=True)


# -----------------------------------------------------------------------------
# the scripts, as a user runs them


def run_script(script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_train(*args):
    return run_script('train.py', *args, timeout=120)


def run_main(script, *args):
    """A script's main() in this process, as `python script args` would run it, for refusals that come before
    any work (a process start costs seconds): its exit code, stdout and stderr, like run_script's. An exception
    other than a refusal's SystemExit propagates: the traceback a user would have seen fails the test."""
    module = importlib.import_module(script[:-3])
    out, err, argv0, cwd = io.StringIO(), io.StringIO(), sys.argv[0], os.getcwd()
    sys.argv[0] = os.path.join(ROOT, script)
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main(list(args))
                code = 0
            except SystemExit as e:  # fail() raises SystemExit('error: ...'), which Python prints to stderr
                code = e.code if isinstance(e.code, int) else 1
                print(e.code if e.code is not None and not isinstance(e.code, int) else '', file=sys.stderr)
    finally:
        sys.argv[0] = argv0
        os.chdir(cwd)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


SMOKE = ['config/smoke.py', '--eval_batches=1', '--log_interval=1']


@pytest.fixture(scope='session')
def tiny_ckpt(tmp_path_factory):
    """A 4-step smoke checkpoint, trained once per test session."""
    out = tmp_path_factory.mktemp('run')
    r = run_train('config/smoke.py', '--max_iters=4', '--eval_interval=4', '--eval_batches=1', f'--out_dir={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    return out / 'ckpt.pt'
