"""
Throughput and the hot paths, each measured in one run so the ratios are fair (warm-up excluded, median of
repeats). Prints a table and writes JSON.

    python bench.py                          # the default train config on this machine, and every micro-benchmark
    python bench.py config/moe.py --compile=True
    python bench.py --only=moe               # just one section: train | attention | moe | sampling
    python bench.py --only=moe --threads=1   # the MoE layer paths on one CPU thread
    python bench.py --only=train --profile=True   # + where the training step's time goes (torch.profiler)
    python bench.py --suite=gpu              # the prepared GPU check, < 8 min on an H100: docs/bench_gpu_<gpu>.json
    python bench.py --only=nanogpt --nanogpt=../nanoGPT   # our step beside nanoGPT's at a matched shape, fp32
    python bench.py --only=shards            # pictures / s / core through the shard path; does it keep up?

FLOPs are counted two ways, each named in the JSON (model.Transfusion.train_flops): 'executed', the matmuls
that run on the step's batch (one FFN per token, the LM head on text targets only, attention over the pairs or
128-wide tiles the kernel computes), and '6N', the convention (6 per active parameter and token, plus
12 n_layer d_model T), which counts work that never runs. MFU = achieved FLOP/s / the device's dense bf16 peak,
looked up by the exact name torch reports (PEAKS_BF16), or --peak_tflops.
"""

import cProfile
import dataclasses
import importlib.util
import io
import itertools
import json
import os
import pstats
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

import torch
from torch.profiler import ProfilerActivity

import data
import pipeline
import prepare_shards
import rae
import shard_data
import tokenizer
import train
import world
from configurator import configure, fail, knobs, precision, resolve_device
from generate import text_to_image
from loader import Loader
from model import ModelConfig, Transfusion, dense_mask, flex_attention, flex_block_mask
from moe import MoE
from optim import configure_optimizer

# -----------------------------------------------------------------------------
out = 'out-bench/bench.json'  # where the JSON goes
only = ''                 # '' = everything; or train | attention | moe | sampling | data | nanogpt | shards
repeats = 5               # timed repeats per measurement (the median is reported)
warmup = 2                # untimed calls before them
threads = 0               # torch CPU threads; 0 = torch's default (the core count)
moe_tokens = 4096         # MoE layer benchmark: tokens per call
moe_width = 256           #   d_model
moe_hidden = 64           #   d_expert
moe_k = 8                 #   active experts per token (1 per-modality shared + 7 routed)
moe_pools = '8,64'        #   routed expert counts E to time
profile = False           # train: also profile 3 steps, top ops by self time (printed and in the JSON)
peak_tflops = 0.0         # 0 = look the device up (CUDA bf16 dense peaks below); CPU: MFU not reported
suite = ''                # gpu: the prepared GPU check (test_cuda.py, the paper steps, MoE, data wait) -> docs/
suite_dense = 'config/paper_modality.py'  # suite=gpu: the dense model's config file(s), comma-separated
suite_moe = 'config/paper_moe256.py'      # suite=gpu: the MoE model's, timed against the dense one
suite_layers = 4          # suite=gpu: both at this depth (the 13.5B MoE's 16 layers do not fit one 80 GB GPU)
suite_args = ''           # suite=gpu: more --key=value flags for both models (the CPU dry run narrows them)
nanogpt = ''              # a folder holding nanoGPT's model.py (not part of this repository) for --only=nanogpt
shard_pictures = 512      # shards: JPEGs in the synthetic shards timed when image_shards is not set
shard_px = 256            # shards: their size (img2dataset's default resize)
# -----------------------------------------------------------------------------

# dense bf16 tensor-core TFLOP/s (the vendors' data sheets, without sparsity), by torch.cuda.get_device_name()
PEAKS_BF16 = {'NVIDIA H100 80GB HBM3': 989.4, 'NVIDIA H100 PCIe': 756.0, 'NVIDIA H100 NVL': 835.0,
              'NVIDIA H200': 989.4, 'NVIDIA H200 NVL': 835.0, 'NVIDIA A100-SXM4-80GB': 312.0,
              'NVIDIA A100-SXM4-40GB': 312.0, 'NVIDIA A100 80GB PCIe': 312.0, 'NVIDIA A100-PCIE-40GB': 312.0,
              'NVIDIA L4': 121.0, 'NVIDIA GeForce RTX 4090': 165.2}


def timed(fn, device):
    """Median seconds of fn() over `repeats`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_peak(cfg, device):
    """The device's dense bf16 peak (--peak_tflops overrides; 0 where unknown: no MFU then)."""
    if cfg['peak_tflops'] or device.type != 'cuda':
        return cfg['peak_tflops']
    name = torch.cuda.get_device_name(device)
    if name not in PEAKS_BF16:
        print(f"  no peak known for {name!r}: pass --peak_tflops for an MFU")
    return PEAKS_BF16.get(name, 0.0)


def bench_train(cfg, device, encoder=None):
    """One training step (forward, backward, optimizer) on the config's model and a real batch, its pending
    pictures encoded on the device as train.py does; FLOPs executed and by the 6N convention, each with its MFU;
    the data side: building a batch, and the share of a step spent waiting for one (data_wait)."""
    tok, text = pipeline.check(cfg)
    encoder = encoder if encoder is not None else rae.build_encoder(cfg)
    mcfg = pipeline.model_config(cfg, tok, encoder.d_latent, encoder.n_tokens)
    dataset = pipeline.make_dataset(cfg, tok, encoder, text, seed=0)
    dataset.build_caches()
    encoder.to(device)
    model = Transfusion(mcfg).to(device)
    if cfg['compile']:
        model.compile_blocks()
    opt = configure_optimizer(model, cfg['optimizer'], 1e-4, cfg['muon_lr'] / 10, 0.1, (0.9, 0.95), device.type)
    batch = dataset.get('train', 0).to(device)
    dtype, amp = precision(cfg['dtype'], device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()

    def step(b=batch):
        with amp:
            loss, _ = model(data.encode_pending(dataclasses.replace(b), encoder))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, device)
    steps = itertools.count(1)  # the data side of a step: build (pack) a fresh training batch
    workers = cfg['data_workers'] if cfg['data_workers'] >= 0 else 4 if device.type == 'cuda' else 0
    res_data = {'data_ms_per_batch': 1e3 * timed(lambda: dataset.get('train', next(steps)), torch.device('cpu')),
                **data_wait(step, dataset, workers, device)}
    flex = model.make_mask(batch.doc[:1, :1], batch.block[:1, :1], True).__class__.__name__ == 'BlockMask'
    flops = model.train_flops(data.encode_pending(dataclasses.replace(batch), encoder), tile=128 if flex else 0)
    tokens = cfg['batch_size'] * cfg['block_size']
    res = {'config': {**{k: cfg[k] for k in ('d_model', 'n_layer', 'ffn', 'block_size', 'batch_size', 'compile')},
                      'dtype': dtype, 'attention': 'flex' if flex else 'sdpa'},
           'params_active': model.count_params()['active'], 'ms_per_step': 1e3 * sec, 'tokens_per_s': tokens / sec,
           'flops_per_step_executed': flops['executed'], 'flops_per_step_6N': flops['6N'],
           'achieved_tflops_executed': flops['executed'] / sec / 1e12, 'achieved_tflops_6N': flops['6N'] / sec / 1e12,
           **res_data}
    peak = device_peak(cfg, device)
    if peak:
        res['peak_tflops'] = peak
        res['mfu_executed'] = res['achieved_tflops_executed'] / peak
        res['mfu_6N'] = res['achieved_tflops_6N'] / peak
    res['peak_memory_mb'] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == 'cuda'
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if cfg['profile']:
        res['profile'] = profile_step(step, device)
    return res


def data_wait(step, dataset, workers, device, n_steps=None):
    """Steps fed by train.py's loader (data_workers background processes, or built in the loop with 0): the
    share of the wall time spent waiting for the next batch, after a warm-up of one prefetch round."""
    n_steps = n_steps or 4 * repeats
    batches = Loader(dataset, 0, workers=workers, pin=device.type == 'cuda')
    for _ in range(2 * max(1, workers)):
        step(next(batches)[2].to(device))
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(n_steps):
        t1 = time.perf_counter()
        b = next(batches)[2].to(device)
        waited += time.perf_counter() - t1
        step(b)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return {'data_workers': workers, 'data_wait_share': waited / (time.perf_counter() - t0)}


def profile_step(step, device, n_steps=3, top=12):
    """Self time of each op over n_steps warm steps, as shares of the total, largest first."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n_steps):
            step()
    attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    rows = [{'op': e.key, 'share': round(getattr(e, attr) / total, 3),
             'ms_per_step': round(getattr(e, attr) / 1e3 / n_steps, 1), 'calls_per_step': e.count // n_steps}
            for e in events[:top]]
    print(f"  {'op':40s} {'share':>6s} {'ms/step':>8s} {'calls':>6s}")
    for r in rows:
        print(f"  {r['op'][:40]:40s} {r['share']:6.1%} {r['ms_per_step']:8.1f} {r['calls_per_step']:6d}")
    return rows


def bench_attention(device):
    """SDPA with a dense boolean mask vs flex_attention with a block mask, same packed-sequence mask."""
    if device.type != 'cuda':
        return {'skipped': 'flex_attention is timed on CUDA only (CPU flex is an unfused reference path)'}
    B, H, T, hd = 4, 16, 2048, 64
    doc = torch.arange(T, device=device).div(512, rounding_mode='floor').expand(B, -1)
    block = torch.where((torch.arange(T, device=device) % 512) >= 256, doc, -1)
    q, k, v = (torch.randn(B, H, T, hd, device=device, dtype=torch.bfloat16) for _ in range(3))
    mask, bmask = dense_mask(doc, block), flex_block_mask(doc, block)
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask), device)
    flex = timed(lambda: flex_attention(q, k, v, bmask), device)
    return {'sdpa_ms': 1e3 * sdpa, 'flex_ms': 1e3 * flex, 'flex_speedup': sdpa / flex}


def bench_moe(cfg, device):
    """One MoE layer (moe.py), forward + backward, tokens/s: the fast path (torch._grouped_mm, what 'auto' runs)
    against the per-expert python loop, at each pool size in moe_pools with moe_k active experts (1 per-modality
    shared + moe_k - 1 routed), fp32. The two are timed interleaved, repeat by repeat, so a change in the load
    of a shared machine hits both alike; medians after warm-up. The 1-minute load average is recorded: with
    more runnable threads than cores every op pays a synchronisation stall, which favours the path with fewer
    ops (grouped) far beyond what it gains on idle cores."""
    N, D, Fh, k = cfg['moe_tokens'], cfg['moe_width'], cfg['moe_hidden'], cfg['moe_k']
    fast = 'grouped'
    paths = [fast, 'loop']
    res = {'shape': f"N={N} d_model={D} d_expert={Fh} top_k={k} (1 shared + {k - 1} routed)", 'fast_path': fast,
           'threads': torch.get_num_threads()}
    if hasattr(os, 'getloadavg'):
        res['load_avg_1min_before'] = os.getloadavg()[0]
    torch.manual_seed(0)
    x = torch.randn(N, D, device=device, requires_grad=True)
    modality = torch.randint(0, 2, (N,), device=device)
    rows = []
    for E in (int(e) for e in str(cfg['moe_pools']).split(',')):
        torch.manual_seed(0)
        layers = {p: MoE(D, Fh, E, k, shared='modality', dispatch=p).to(device) for p in paths}
        for p in paths[1:]:
            layers[p].load_state_dict(layers[fast].state_dict())  # same weights, same routing

        def step(p):
            y, aux = layers[p](x, modality)
            (y.square().mean() + aux['balance'] + aux['z']).backward()

        times = {p: [] for p in paths}
        for i in range(warmup + repeats):
            for p in paths:
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(p)
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[p].append(time.perf_counter() - t0)
        tps = {p: N / statistics.median(t) for p, t in times.items()}
        for p in paths:
            rows.append({'experts': E, 'path': p, 'tokens_per_s': round(tps[p]),
                         'ms': round(1e3 * statistics.median(times[p]), 1), 'vs_loop': round(tps[p] / tps['loop'], 2)})
        res[f'E{E}_fast_over_loop'] = round(tps[fast] / tps['loop'], 2)
    res['table'] = rows
    if hasattr(os, 'getloadavg'):
        res['load_avg_1min_after'] = os.getloadavg()[0]
    print(f"  {'E':>4s} {'path':8s} {'tokens/s':>10s} {'ms':>8s} {'vs loop':>8s}")
    for r in rows:
        print(f"  {r['experts']:4d} {r['path']:8s} {r['tokens_per_s']:10d} {r['ms']:8.1f} {r['vs_loop']:7.2f}x")
    return res


def bench_sampling(device):
    """One text->image generation (25 Euler steps, CFG) after a 256-token prefix, with and without the KV cache."""
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=512, d_model=256, n_layer=6, n_head=8, n_kv_head=4, d_ff=768)
    model = Transfusion(cfg).to(device).eval()
    tok = tokenizer.Tokenizer()
    prompt = 'a ' * 127  # 254 bytes + <BOS> + <BOI> = a 256-token prefix
    res = {}
    # with CFG the unconditional branch (<BOS><BOI>, no prefix) costs the same in both modes, which caps the
    # ratio near 3x here; without guidance (cfg_scale 1, as world-model rollouts run) the prefix is everything
    for scale, tag in ((3.0, ''), (1.0, '_no_cfg')):
        for use_cache in (True, False):
            res[('cached_s' if use_cache else 'uncached_s') + tag] = timed(
                lambda: text_to_image(model, tok, prompt, B=1, steps=25, cfg_scale=scale,
                                             use_cache=use_cache), device)
        res['cache_speedup' + tag] = res['uncached_s' + tag] / res['cached_s' + tag]
    return res


def bench_data(cfg):
    """Where building one training batch goes, at the config's shapes (on the host, where workers build them):
    ms per batch, and the functions that take the most of it (cProfile, cumulative)."""
    tok, text = pipeline.check(cfg)
    dataset = pipeline.make_dataset(cfg, tok, rae.build_encoder(cfg), text, seed=0)
    dataset.build_caches()
    dataset.get('train', 0)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for i in range(1, 1 + repeats):
        dataset.get('train', i)
    prof.disable()
    ms = 1e3 * (time.perf_counter() - t0) / repeats
    stats = pstats.Stats(prof).sort_stats('cumulative')
    rows = sorted(((f"{os.path.basename(f)}:{fn}", ct / repeats * 1e3) for (f, _, fn), (_, _, _, ct, _) in
                   stats.stats.items() if 'site-packages' not in f and not f.startswith('<')), key=lambda r: -r[1])
    return {'ms_per_batch': ms, 'rows': cfg['batch_size'], 'block_size': cfg['block_size'],
            'image_size': cfg['image_size'], 'top_ms': [{'where': w, 'ms': round(t, 2)} for w, t in rows[1:9]]}


def synthetic_shards(folder, n, px):
    """n captioned world scenes as px² JPEGs (quality 90, with pixel noise so that they decode about as slowly
    as photographs) in shards of 128: what img2dataset writes, without a download."""
    rng = np.random.default_rng(0)
    for s in range(0, n, 128):
        samples = []
        for i in range(s, min(n, s + 128)):
            scene = world.sample_scene(rng)
            img = world.render(scene, px, rng=rng).astype(np.float32) + rng.normal(0, 8, (px, px, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
            samples.append((f"{i:09d}", {'jpg': buf.getvalue(), 'txt': world.caption(scene, rng).encode()}))
        prepare_shards.write_shard(os.path.join(folder, f"{s // 128:05d}.tar"), samples)
    return os.path.join(folder, '*.tar')


def bench_shards(cfg, device):
    """The shard path (shard_data.py): pictures per second per core read from tars, decoded, converted and
    resized in one process (as one data worker does; CPU seconds, so other jobs on the machine do not count),
    alone and inside whole batches; then train.py's step fed by data_workers from the shards: the pictures a
    step takes, the cores that needs at that rate, and the share of the step spent waiting."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = cfg['image_shards'] or synthetic_shards(tmp, cfg['shard_pictures'], cfg['shard_px'])
        mixture = cfg['mixture'] if 'qa' not in cfg['mixture'] else 'text=0.2,caption2image=0.5,image2caption=0.3'
        run = {**cfg, 'image_shards': spec, 'mixture': mixture, 'image_folder': '', 'shard_max_bad': 1.0}
        tok, text = pipeline.check(run)
        encoder = rae.build_encoder({**run, 'image_shards': ''})   # the world's (cached): only the time matters
        sd = shard_data.ShardData(run, tok, encoder.res, encoder.n_tokens, seed=0)
        sd.begin('train', 0, 0, '', None)
        n = 4 * cfg['repeats'] * 32
        sd.document('caption2image', 'train')          # the shuffle buffer's first fill is not timed
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            sd.document('caption2image', 'train')
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        dataset = pipeline.make_dataset(run, tok, encoder, text, seed=0)
        batches = [dataset.get('train', i) for i in range(2)]   # warm
        threads = torch.get_num_threads()
        torch.set_num_threads(1)              # as in a data worker (loader.one_thread)
        c0 = time.process_time()
        batches = [dataset.get('train', i) for i in range(2, 2 + 2 * cfg['repeats'])]
        per_batch = float(np.mean([len(b.pending) for b in batches]))
        batch_rate = per_batch * len(batches) / (time.process_time() - c0)
        torch.set_num_threads(threads)
        step = bench_train(run, device, encoder)
    rate, step_s = n / cpu, step['ms_per_step'] / 1e3
    return {'shards': cfg['image_shards'] or f"{cfg['shard_pictures']} synthetic {cfg['shard_px']}² JPEGs",
            'image_size': cfg['image_size'], 'mixture': mixture, 'pictures_per_s_per_core': rate,
            'pictures_per_s_wall': n / wall, 'batch_pictures_per_s_per_core': batch_rate,
            'pictures_per_step': per_batch * cfg['grad_accum'], 'ms_per_step': step['ms_per_step'],
            'cores_needed': per_batch * cfg['grad_accum'] / step_s / batch_rate,
            'data_workers': step['data_workers'], 'data_wait_share': step['data_wait_share'],
            'keeps_up': step['data_wait_share'] < 0.05}


def bench_nanogpt(cfg, device):
    """Our step beside nanoGPT's at one shape (d 256, 4 layers, 8 heads, 8 x 256 tokens, fp32, AdamW), timed
    interleaved: ours on a real batch of the default mixture (pictures, flow loss, per-modality FFN), theirs
    on text (model.py of the folder --nanogpt names; nanoGPT is not part of this repository)."""
    if not cfg['nanogpt'] or not os.path.isfile(os.path.join(cfg['nanogpt'], 'model.py')):
        return {'skipped': 'pass --nanogpt=<a folder holding nanoGPT\'s model.py>'}
    spec = importlib.util.spec_from_file_location('nanogpt_model', os.path.join(cfg['nanogpt'], 'model.py'))
    theirs_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs_mod)
    shape = dict(d_model=256, n_layer=4, n_head=8, block_size=256, batch_size=8)
    run_cfg = {**cfg, **shape, 'dtype': 'float32'}
    tok, text = pipeline.check(run_cfg)
    encoder = rae.build_encoder(run_cfg)
    dataset = pipeline.make_dataset(run_cfg, tok, encoder, text, seed=0)
    ours = Transfusion(pipeline.model_config(run_cfg, tok, encoder.d_latent, encoder.n_tokens)).to(device)
    theirs = theirs_mod.GPT(theirs_mod.GPTConfig(block_size=256, vocab_size=ours.cfg.vocab_size, n_layer=4, n_head=8,
                                                 n_embd=256, dropout=0.0, bias=False)).to(device)
    batch = data.encode_pending(dataset.get('train', 0).to(device), encoder)
    idx = torch.randint(0, ours.cfg.vocab_size, (8, 256), device=device)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs)}
    steps = {'ours': lambda: ours(batch)[0], 'nanogpt': lambda: theirs(idx, idx)[1]}
    times = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for k, fwd in steps.items():
            m = ours if k == 'ours' else theirs
            t0 = time.perf_counter()
            fwd().backward()
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {'shape': shape, 'ms_ours': ms['ours'], 'ms_nanogpt': ms['nanogpt'], 'ours_over_nanogpt': ms['ours'] /
            ms['nanogpt'], 'params_ours': sum(p.numel() for p in ours.parameters()),
            'params_nanogpt': sum(p.numel() for p in theirs.parameters())}


def gpu_suite(defaults, cfg, device, name):
    """The prepared GPU check in one command, every section guarded and the JSON rewritten as each completes
    (a failure loses only its own numbers): the CUDA tests; the dense paper-width step eager and compiled
    (MFU, executed and 6N) and the MoE's at the same depth (suite_layers: the 13.5B MoE's 16 layers do not fit
    one 80 GB GPU), MoE tokens/s against dense at equal active parameters; the data wait with background
    workers; the MoE layer grouped vs loop; flex vs SDPA. One JSON, named after the GPU."""
    t0 = time.time()
    path = (cfg['out'] if cfg['out'] != out else  # --out, or docs/ named after the GPU
            os.path.join('docs', f"bench_gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_').lower()}.json"))
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    res = {'device': name, 'torch': torch.__version__}
    shrink = [f'--n_layer={cfg["suite_layers"]}', '--batch_size=1', '--grad_accum=1', '--n_images=256',
              '--rae_images=256', *cfg['suite_args'].split()]

    def section(tag, fn):
        print(f"[{tag}] ...", flush=True)
        try:
            res[tag] = fn()
        except Exception as e:  # record it and go on: the other sections' numbers still count
            res[tag] = {'error': f"{type(e).__name__}: {str(e)[:500]}"}
        res['seconds'] = time.time() - t0
        with open(path, 'w') as f:
            json.dump(res, f, indent=1, default=str)
        print(f"  {res[tag]}"[:400], flush=True)

    def test_cuda():
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', 'tests/test_cuda.py'], capture_output=True,
                           text=True, timeout=240, cwd=os.path.dirname(os.path.abspath(__file__)))
        return {'returncode': r.returncode, 'summary': (r.stdout.strip().splitlines() or [''])[-1]}

    def train_of(paths, compiled):
        return bench_train(configure(defaults, [*paths.split(','), *shrink, f'--compile={compiled}',
                                                f'--device={cfg["device"]}']), device)
    section('test_cuda', test_cuda)
    section('dense_eager', lambda: train_of(cfg['suite_dense'], False))
    section('dense_compiled', lambda: train_of(cfg['suite_dense'], True))
    compiled = res['dense_compiled'].get('tokens_per_s', 0) > res['dense_eager'].get('tokens_per_s', 0)
    section('moe', lambda: train_of(cfg['suite_moe'], compiled))
    dense = max(res[k].get('tokens_per_s', 0) for k in ('dense_eager', 'dense_compiled'))
    if dense and 'tokens_per_s' in res['moe']:
        res['moe_vs_dense'] = res['moe']['tokens_per_s'] / dense
    section('moe_layer', lambda: bench_moe({**cfg, 'moe_pools': '64'}, device))
    section('attention', lambda: bench_attention(device))
    print(f"wrote {path} in {res['seconds']:.0f} s")


def main(argv):
    """The train step is timed on train.py's config (its knobs, config files and all), plus this file's."""
    own, run = knobs(globals()), knobs(vars(train))
    help_sections = [('bench (bench.py)', list(own), __file__), ('run (train.py)', list(run), train.__file__),
                     *pipeline.help_sections()]
    defaults = {**pipeline.run_knobs(), **run, **own}
    cfg = configure(defaults, argv, __doc__, help_sections)
    globals().update({k: cfg[k] for k in ('repeats', 'warmup')})
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    device = resolve_device(cfg['device'])
    if cfg['suite'] not in ('', 'gpu'):
        fail(f"--suite must be gpu (or empty), got {cfg['suite']!r}")
    if cfg['suite'] == 'gpu':
        if device.type != 'cuda' and cfg['device'] != 'cpu':
            fail("--suite=gpu needs a CUDA GPU (--device=cpu runs it here as a dry run, narrowed: "
                 "--suite_layers=1 --suite_args='--d_model=64 --n_head=4 --n_kv_head=2 --d_ff=128 --vocab_size=0 "
                 "--moe_experts=6 --moe_top_k=3 --moe_d_expert=32')")
        name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu dry run'
        return gpu_suite(defaults, cfg, device, name)
    sections = {'train': lambda: bench_train(cfg, device), 'attention': lambda: bench_attention(device),
                'moe': lambda: bench_moe(cfg, device), 'sampling': lambda: bench_sampling(device),
                'data': lambda: bench_data(cfg), 'nanogpt': lambda: bench_nanogpt(cfg, device),
                'shards': lambda: bench_shards(cfg, device)}
    if cfg['only'] and cfg['only'] not in sections:
        fail(f"--only must be one of {', '.join(sections)}, got {cfg['only']!r}")
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f"CPU ({torch.get_num_threads()} threads)"
    results = {'device': name, 'torch': torch.__version__}
    for key, fn in sections.items():
        if not cfg['only'] or cfg['only'] == key:
            print(f"[{key}] ...", flush=True)
            results[key] = fn()
            for k, v in results[key].items():
                if k not in ('table', 'profile', 'top_ms'):
                    print(f"  {k:24s} {v if not isinstance(v, float) else f'{v:.4g}'}")
    os.makedirs(os.path.dirname(cfg['out']) or '.', exist_ok=True)
    with open(cfg['out'], 'w') as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {cfg['out']} ({name})")


if __name__ == '__main__':
    main(sys.argv[1:])
