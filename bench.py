"""
Throughput and the hot paths, each measured in one run so the ratios are fair (warm-up excluded, median of
repeats). Prints a table and writes JSON.

    python bench.py                          # the default train config on this machine, and every micro-benchmark
    python bench.py config/moe.py --compile=True
    python bench.py --only=moe               # just one section: train | attention | moe | sampling

MFU = achieved FLOP/s / peak; model FLOPs per token = 6 * N_active + 12 * n_layer * d_model * T (the attention
scores and values, forward and backward, as in nanoGPT). The peak is looked up for known GPUs, or --peak_tflops.
"""

import json
import os
import resource
import statistics
import sys
import time

import torch

# -----------------------------------------------------------------------------
out = 'bench.json'
only = ''                 # '' = everything; or train | attention | moe | sampling
repeats = 5
warmup = 2
peak_tflops = 0.0         # 0 = look the device up (CUDA bf16 dense peaks below); CPU: MFU not reported
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
    import data
    import train
    from model import Transfusion
    tok, encoder, text, mcfg = train.build(cfg)
    dataset = data.WorldData(tok, encoder, cfg['block_size'], cfg['batch_size'], cfg['mixture'], text=text)
    model = Transfusion(mcfg).to(device)
    opt = model.configure_optimizer(1e-4, 0.1, (0.9, 0.95), device.type)
    fwd = torch.compile(model) if cfg['compile'] else model
    batch = dataset.get('train', 0).to(device)
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else torch.autocast('cpu', enabled=False)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()

    def step():
        with amp:
            loss, _ = fwd(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, device)
    tokens = cfg['batch_size'] * cfg['block_size']
    n_active = model.count_params()['active']
    flops_per_token = 6 * n_active + 12 * mcfg.n_layer * mcfg.d_model * cfg['block_size']
    res = {'config': {k: cfg[k] for k in ('d_model', 'n_layer', 'ffn', 'block_size', 'batch_size', 'compile')},
           'params_active': n_active, 'ms_per_step': 1e3 * sec, 'tokens_per_s': tokens / sec,
           'flops_per_token': flops_per_token, 'achieved_tflops': flops_per_token * tokens / sec / 1e12}
    peak = cfg['peak_tflops'] or (next((v for k, v in PEAKS_BF16.items() if k in torch.cuda.get_device_name()), 0)
                                 if device.type == 'cuda' else 0)
    if peak:
        res['mfu'] = res['achieved_tflops'] / peak
    res['peak_memory_mb'] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == 'cuda'
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return res


def bench_attention(device):
    """SDPA with a dense boolean mask vs flex_attention with a block mask, same packed-sequence mask."""
    from model import dense_mask, flex_attention, flex_block_mask
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


def bench_moe(device):
    """MoE layer forward + backward: the fast path vs the per-expert loop, E in {8, 64}, k = 8."""
    from moe import MoE
    res = {}
    fast = 'grouped' if device.type == 'cuda' else 'padded'
    for E in (8, 64):
        x = torch.randn(4096, 256, device=device, requires_grad=True)
        modality = torch.randint(0, 2, (4096,), device=device)
        row = {}
        for path in (fast, 'loop'):
            torch.manual_seed(0)
            layer = MoE(256, 64, E, 8, shared='modality', dispatch=path).to(device)

            def fb():
                y, aux = layer(x, modality)
                (y.square().mean() + aux['balance']).backward()

            row[path] = 4096 / timed(fb, device)
        res[f'E{E}_k8'] = {'fast_path': fast, 'fast_tokens_per_s': row[fast], 'loop_tokens_per_s': row['loop'],
                           'speedup': row[fast] / row['loop']}
    return res


def bench_sampling(device):
    """One text->image generation (25 Euler steps, CFG) after a 256-token prefix, with and without the KV cache."""
    import data
    import sample
    from model import ModelConfig, Transfusion
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=512, d_model=256, n_layer=6, n_head=8, n_kv_head=4, d_ff=768)
    model = Transfusion(cfg).to(device).eval()
    tok = data.Tokenizer()
    prompt = 'a ' * 127  # 254 bytes + <BOS> + <BOI> = a 256-token prefix
    res = {}
    for use_cache in (True, False):
        res['cached_s' if use_cache else 'uncached_s'] = timed(
            lambda: sample.text_to_image(model, tok, prompt, B=1, steps=25, cfg_scale=3.0, use_cache=use_cache),
            device)
    res['cache_speedup'] = res['uncached_s'] / res['cached_s']
    return res


def main(argv):
    import train
    defaults = {k: v for k, v in vars(train).items() if isinstance(v, (int, float, bool, str)) and not k.startswith('_')}
    defaults.update({k: v for k, v in globals().items() if isinstance(v, (int, float, bool, str)) and not k.startswith('_')})
    cfg = train.configure(defaults, argv)
    globals().update({k: cfg[k] for k in ('repeats', 'warmup')})
    dev = cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(dev)
    sections = {'train': lambda: bench_train(cfg, device), 'attention': lambda: bench_attention(device),
                'moe': lambda: bench_moe(device), 'sampling': lambda: bench_sampling(device)}
    if cfg['only'] and cfg['only'] not in sections:
        raise SystemExit(f"error: --only must be one of {', '.join(sections)}, got {cfg['only']!r}")
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f"CPU ({torch.get_num_threads()} threads)"
    results = {'device': name, 'torch': torch.__version__}
    for key, fn in sections.items():
        if not cfg['only'] or cfg['only'] == key:
            print(f"[{key}] ...", flush=True)
            results[key] = fn()
            for k, v in results[key].items():
                print(f"  {k:24s} {v if not isinstance(v, float) else f'{v:.4g}'}")
    with open(cfg['out'], 'w') as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {cfg['out']} ({name})")


if __name__ == '__main__':
    main(sys.argv[1:])
