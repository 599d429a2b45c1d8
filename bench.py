"""
Throughput and the hot paths, each measured in one run so the ratios are fair (warm-up excluded, median of
repeats). Prints a table and writes JSON.

    python bench.py                          # the default train config on this machine, and every micro-benchmark
    python bench.py config/moe.py --compile=True
    python bench.py --only=moe               # just one section: train | attention | moe | sampling
    python bench.py --only=moe --threads=1   # the MoE layer paths on one CPU thread
    python bench.py --only=train --profile=True   # + where the training step's time goes (torch.profiler)
    python bench.py --suite=gpu              # the prepared GPU check, < 8 min on an H100: docs/bench_gpu_<gpu>.json

MFU = achieved FLOP/s / peak; model FLOPs per token = 6 * N_active + 12 * n_layer * d_model * T (the attention
scores and values, forward and backward, as in nanoGPT). The peak is looked up for known GPUs, or --peak_tflops.
"""

import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity

import pipeline
import rae
import tokenizer
import train
from configurator import configure, fail, knobs, precision, resolve_device
from generate import text_to_image
from loader import Loader
from model import ModelConfig, Transfusion, dense_mask, flex_attention, flex_block_mask
from moe import MoE
from optim import configure_optimizer

# -----------------------------------------------------------------------------
out = 'out-bench/bench.json'  # where the JSON goes
only = ''                 # '' = everything; or train | attention | moe | sampling
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
# -----------------------------------------------------------------------------

PEAKS_BF16 = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L4': 121.0, 'RTX 4090': 165.0}  # dense TFLOP/s


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


def bench_train(cfg, device):
    tok, text = pipeline.check(cfg)
    encoder = rae.build_encoder(cfg)
    mcfg = pipeline.model_config(cfg, tok, encoder.d_latent, encoder.n_tokens)
    dataset = pipeline.make_dataset(cfg, tok, encoder, text, seed=0)
    model = Transfusion(mcfg).to(device)
    opt = configure_optimizer(model, cfg['optimizer'], 1e-4, cfg['muon_lr'] / 10, 0.1, (0.9, 0.95), device.type)
    fwd = torch.compile(model) if cfg['compile'] else model
    batch = dataset.get('train', 0).to(device)
    dtype, amp = precision(cfg['dtype'], device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()

    def step(b=batch):
        with amp:
            loss, _ = fwd(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, device)
    steps = itertools.count(1)  # the data side of a step: build (pack) a fresh training batch
    res_data = {'data_ms_per_batch': 1e3 * timed(lambda: dataset.get('train', next(steps)), torch.device('cpu')),
                **data_wait(step, dataset, cfg['data_workers'], device)}
    tokens = cfg['batch_size'] * cfg['block_size']
    n_active = model.count_params()['active']
    flops_per_token = model.flops_per_token()
    res = {'config': {**{k: cfg[k] for k in ('d_model', 'n_layer', 'ffn', 'block_size', 'batch_size', 'compile')},
                      'dtype': dtype},
           'params_active': n_active, 'ms_per_step': 1e3 * sec, 'tokens_per_s': tokens / sec,
           'flops_per_token': flops_per_token, 'achieved_tflops': flops_per_token * tokens / sec / 1e12,
           **res_data}
    peak = cfg['peak_tflops'] or (next((v for k, v in PEAKS_BF16.items() if k in torch.cuda.get_device_name()), 0)
                                 if device.type == 'cuda' else 0)
    if peak:
        res['mfu'] = res['achieved_tflops'] / peak
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


def gpu_suite(defaults, cfg, device, name):
    """The prepared GPU check in one command: the CUDA tests, the dense paper-scale step with compile off and on
    (MFU), the MoE step against it (moe_vs_dense, tokens/s), the MoE layer grouped vs loop at E = 64, and the
    share of the step spent waiting for data with 4 background workers. One JSON, named after the GPU."""
    t0 = time.time()
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', 'tests/test_cuda.py'], capture_output=True,
                       text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    res = {'device': name, 'torch': torch.__version__, 'test_cuda': {
        'returncode': r.returncode, 'summary': (r.stdout.strip().splitlines() or [''])[-1]}}
    print(f"[test_cuda.py] {res['test_cuda']['summary']}", flush=True)
    # one 4,096-token row a step, a small picture pool (224-pixel latents of 16,384 pictures would be 5 GB)
    shapes = ['--batch_size=1', '--n_images=256', '--rae_images=256', '--data_workers=4']
    for tag, path, compiled in (('dense_eager', cfg['suite_dense'], False),
                                ('dense_compiled', cfg['suite_dense'], True),
                                ('moe', cfg['suite_moe'], None)):
        if compiled is None:  # the MoE step in whichever mode the dense one was faster
            compiled = res['dense_compiled']['tokens_per_s'] > res['dense_eager']['tokens_per_s']
        print(f"[{tag}] {path} ...", flush=True)
        run_cfg = configure(defaults, [*path.split(','), *shapes, f'--compile={compiled}', f'--device={cfg["device"]}'])
        res[tag] = bench_train(run_cfg, device)
        print(f"  {res[tag]['ms_per_step']:.1f} ms, {res[tag]['tokens_per_s']:.0f} tokens/s, "
              f"MFU {res[tag].get('mfu', float('nan')):.3f}, data wait {res[tag]['data_wait_share']:.1%}", flush=True)
    best = max(res['dense_eager']['tokens_per_s'], res['dense_compiled']['tokens_per_s'])
    res['moe_vs_dense'] = res['moe']['tokens_per_s'] / best
    print("[moe layer] ...", flush=True)
    res['moe_layer'] = bench_moe({**cfg, 'moe_pools': '64'}, device)
    res['seconds'] = time.time() - t0
    path = (cfg['out'] if cfg['out'] != out else  # --out, or docs/ named after the GPU
            os.path.join('docs', f"bench_gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_').lower()}.json"))
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(res, f, indent=1, default=str)
    print(f"moe_vs_dense {res['moe_vs_dense']:.2f}; wrote {path} in {res['seconds']:.0f} s")


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
            fail("--suite=gpu needs a CUDA GPU (--device=cpu runs it here as a dry run, with small configs: "
                 "--suite_dense=config/smoke.py --suite_moe=config/smoke.py,config/moe.py)")
        name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu dry run'
        return gpu_suite(defaults, cfg, device, name)
    sections = {'train': lambda: bench_train(cfg, device), 'attention': lambda: bench_attention(device),
                'moe': lambda: bench_moe(cfg, device), 'sampling': lambda: bench_sampling(device)}
    if cfg['only'] and cfg['only'] not in sections:
        fail(f"--only must be one of {', '.join(sections)}, got {cfg['only']!r}")
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f"CPU ({torch.get_num_threads()} threads)"
    results = {'device': name, 'torch': torch.__version__}
    for key, fn in sections.items():
        if not cfg['only'] or cfg['only'] == key:
            print(f"[{key}] ...", flush=True)
            results[key] = fn()
            for k, v in results[key].items():
                if k not in ('table', 'profile'):
                    print(f"  {k:24s} {v if not isinstance(v, float) else f'{v:.4g}'}")
    os.makedirs(os.path.dirname(cfg['out']) or '.', exist_ok=True)
    with open(cfg['out'], 'w') as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {cfg['out']} ({name})")


if __name__ == '__main__':
    main(sys.argv[1:])
