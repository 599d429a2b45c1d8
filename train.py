"""
Train the interleaved text + image model (nanoGPT style).

    python train.py                                  # the CPU default on the embedded world
    python train.py config/smoke.py                  # a config file ...
    python train.py config/smoke.py --max_iters=50   # ... and --key=value overrides (type-checked)
    torchrun --standalone --nproc_per_node=2 train.py  # DDP (gloo on CPU, nccl on CUDA)

Every knob below is a module-level default. Unknown keys and values of the wrong type are refused before any
work starts.
"""

import ast
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch

# -----------------------------------------------------------------------------
# defaults: the CPU run on the embedded world (config/default.py says the same, for reference)
out_dir = 'out'
init_from = 'scratch'     # scratch | resume (from out_dir/ckpt.pt)
seed = 1337
device = 'auto'           # auto | cpu | cuda
dtype = 'auto'            # auto (bf16 on CUDA and CPUs with native bf16, else fp32) | float32 | bfloat16
# data
tokenizer = 'world'       # world (a BPE learnt from the world's text) | byte | a tiktoken encoding (gpt2)
vocab_size = 0            # 0 = the tokenizer's; larger pads the embedding (the paper's LLaMA-3 size: 128256)
text_source = ''          # '' = the world's text documents; else a .txt path or http(s) URL of real text
mixture = 'text=0.1,caption2image=0.45,image2caption=0.15,qa=0.3'   # + video, action; 'paper': §2.5
video_frames = 5          # frames per video / action clip (each 64 latents + 2): must fit in block_size
p_uncond = 0.1            # caption dropout for classifier-free guidance (PAPER.md §4)
image_size = 32
patch_size = 4            # (32/4)^2 = 64 latent tokens per picture
encoder = 'vit'           # pixel | vit | dinov2 | siglip2: the frozen RAE encoder (rae.py; built once into cache_dir)
encoder_path = ''         # dinov2 / siglip2: a local folder or a Hugging Face repo id
cache_dir = 'cache'       # built RAEs and latent caches, shared by every run
n_images = 16384          # training pictures, encoded once into the latent cache
mae_steps = 1000          # vit encoder pretraining steps (rae.py)
decoder_steps = 800       # RAE decoder training steps (rae.py)
block_size = 256          # clips need 512 (config/world.py)
batch_size = 16
grad_accum = 1
# model
d_model = 256
n_layer = 6
n_head = 8
n_kv_head = 4
d_ff = 768
ffn = 'modality'          # dense | modality | moe
moe_experts = 16          # moe: routed experts
moe_top_k = 4             # moe: active experts per token, shared included
moe_d_expert = 0          # moe: expert hidden size (0 = d_ff / moe_top_k: active compute = dense)
moe_shared = 'modality'   # moe: none | global | modality
moe_balance = 0.01        # moe: load-balancing loss coefficient
moe_z = 1e-3              # moe: router z-loss coefficient
moe_dispatch = 'auto'     # moe: auto | grouped | loop
flow_target = 'v'         # v | x
flow_weight = 3.0
shift = 3.0               # noise shift alpha; 0 = sqrt(N*d/4096) (= 0.87 for 64x48: see README)
attn = 'auto'             # auto | sdpa | flex
# optimiser (Transfusion's AdamW settings, PAPER.md §5)
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
max_iters = 900
lr_decay_iters = 0        # 0 = max_iters; the cosine reaches min_lr here (larger: stop part-way down a longer schedule)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# eval, logging, checkpoints
eval_interval = 100
eval_batches = 4
log_interval = 10
skip_nonfinite = False    # True: skip a step whose loss is NaN/inf instead of stopping
compile = False
fsdp = False              # under torchrun: shard weights, grads and optimizer state with FSDP2 instead of DDP
meta = False              # True: build the model on the meta device, print its parameter counts, exit
# -----------------------------------------------------------------------------


def knobs(namespace):
    """The config keys of a script: its module-level ints, floats, bools and strings."""
    return {k: v for k, v in namespace.items() if isinstance(v, (int, float, bool, str)) and not k.startswith('_')}


def configure(defaults, argv):
    """nanoGPT's configurator, with errors instead of surprises: config files are python files that assign
    known keys; --key=value is parsed as a python literal (or kept as a string) and must match the type."""
    def set_key(key, value, where):
        if key not in defaults:
            raise SystemExit(f"error: unknown config key '{key}' ({where})")
        old = defaults[key]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(old):
            raise SystemExit(f"error: config key '{key}' wants {type(old).__name__}, got {value!r} ({where})")
        defaults[key] = value

    for arg in argv:
        if arg.startswith('--'):
            key, eq, val = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"error: flag {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                value = val
            set_key(key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file {arg!r} does not exist")
            scope = {}
            exec(open(arg).read(), {}, scope)
            for key, value in scope.items():
                if not key.startswith('_'):
                    set_key(key, value, arg)
    return defaults


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (0: max_iters)."""
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / cfg['warmup_iters']
    end = cfg['lr_decay_iters'] or cfg['max_iters']
    progress = min(1.0, (it - cfg['warmup_iters']) / max(1, end - cfg['warmup_iters']))
    return cfg['min_lr'] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg['learning_rate'] - cfg['min_lr'])


def build(cfg, fit=True):
    """Tokenizer, encoder, real text and model config from a flat config dict (shared with sample/eval/bench).
    fit=False skips measuring the encoder's normalisation (for a model built only to be counted)."""
    import data
    import rae
    from model import ModelConfig
    tok = data.get_tokenizer(cfg['tokenizer'])
    encoder = rae.build_encoder(cfg, fit=fit)
    rae.check_width(cfg['d_model'], encoder)
    text = data.load_text(cfg['text_source']) if cfg['text_source'] else None
    vocab = cfg['vocab_size'] or tok.vocab_size
    if vocab < tok.vocab_size:
        raise SystemExit(f"error: vocab_size={vocab} is smaller than the {cfg['tokenizer']} tokenizer's {tok.vocab_size}")
    shapes = {'vocab_size': vocab, 'd_latent': encoder.d_latent, 'n_latent': encoder.n_tokens}
    mcfg = ModelConfig(**{**{f.name: cfg[f.name] for f in fields(ModelConfig) if f.name in cfg}, **shapes})
    return tok, encoder, text, mcfg


def native_bf16_cpu():
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Elsewhere bf16 matmuls are emulated and
    slower than fp32. (torch.cpu's probes are private; a torch without them counts as no.)"""
    probes = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def precision(dtype, device):
    """-> (dtype name, context to run the forward in): bf16 autocast (fp32 weights, optimizer and loss
    reductions) or plain fp32. 'auto' = bf16 on CUDA and on CPUs with native bf16 (the default step's matmuls
    are 60% of its time in fp32; bf16 halves them: README "Speed"), fp32 on other CPUs."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' or native_bf16_cpu() else 'float32'
    if dtype not in ('float32', 'bfloat16'):
        raise SystemExit(f"error: dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return dtype, torch.autocast(device.type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()


@torch.no_grad()
def evaluate(model, dataset, n_batches, device, ctx):
    """Held-out losses, each on its own document kind so the numbers do not depend on the mixture:
    text perplexity on text documents, caption loss on image->caption, flow loss on caption->image.
    Noise and t are drawn from a fixed seed, so evaluations at different steps are comparable."""
    model.eval()
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(0)
        kinds = [('text', 'text=1', 'lm_loss'), ('caption', 'image2caption=1', 'lm_loss'),
                 ('flow', 'caption2image=1', 'flow_loss')]
        kinds += [(f'{k}_flow', f'{k}=1', 'flow_loss') for k in ('video', 'action') if k in dataset.kinds]
        for name, kind, key in kinds:
            losses = []
            for i in range(n_batches):
                batch = dataset.get('val', i, mixture=kind).to(device)
                with ctx:
                    _, m = model(batch)
                losses.append(m[key].item())
            out[f'val_{name}_loss'] = sum(losses) / len(losses)
    out['val_text_ppl'] = math.exp(out['val_text_loss'])
    model.train()
    return out


def seed_of(*ints):
    """One 63-bit seed from several integers (seed, step, micro-batch): every step's randomness is a function
    of where it is, so nothing but the step has to be saved to resume exactly."""
    return int(np.random.SeedSequence(list(ints)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def save_checkpoint(path, raw_model, optimizer, cfg, step, extra, sharded=False):
    """Everything needed to resume (the data position and all randomness follow from the step); written to a
    temp file and renamed, so a crash during the write leaves the previous checkpoint intact. Call it on every
    rank: FSDP gathers the full weights (a collective), and rank 0 writes."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, optim_sd = get_state_dict(raw_model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_sd, optim_sd = raw_model.state_dict(), optimizer.state_dict()
    if int(os.environ.get('RANK', 0)) != 0:
        return
    save_atomic({'model': model_sd, 'optimizer': optim_sd, 'config': cfg, 'model_config': asdict(raw_model.cfg),
                 'step': step, **extra}, path)


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash mid-write leaves the previous file intact. The temp name
    is per process, so runs sharing a cache_dir may build the same RAE at once."""
    tmp = f'{path}.{os.getpid()}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv):
    cfg = configure(knobs(globals()), argv)
    from tqdm import tqdm
    import data
    from model import Transfusion

    # distributed setup: torchrun sets RANK / WORLD_SIZE
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    dev = cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    if ddp:
        import torch.distributed as dist
        dist.init_process_group('nccl' if dev == 'cuda' else 'gloo')
        if dev == 'cuda':
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
    device = torch.device(dev)
    master = rank == 0
    dtype, ctx = precision(cfg['dtype'], device)

    torch.manual_seed(cfg['seed'])  # the same initial weights on every rank
    # bit-identical reruns and resumes on CPU: embedding / index_put backward otherwise sum in thread order
    torch.use_deterministic_algorithms(device.type == 'cpu')
    if cfg['meta']:  # paper-scale shapes: count without allocating a byte
        _, _, _, mcfg = build(cfg, fit=False)
        with torch.device('meta'):
            counts = Transfusion(mcfg).count_params()
        print(f"{mcfg.ffn} model, d_model {mcfg.d_model} x {mcfg.n_layer} layers: {counts['total'] / 1e9:.3f}B "
              f"parameters, {counts['active'] / 1e9:.3f}B active per token; {counts['paper_active'] / 1e9:.3f}B "
              f"paper-active (without routers and latent adapters, as PAPER.md counts)")
        return
    # rank 0 builds the RAE and the latent caches (or finds them in cache_dir, which multi-node runs must share
    # or prebuild with `python rae.py`); the other ranks wait, then read the same files
    if ddp and not master:
        dist.barrier()
    tok, encoder, text, mcfg = build(cfg)
    dataset = data.WorldData(tok, encoder, cfg['block_size'], cfg['batch_size'], cfg['mixture'],
                             seed=cfg['seed'], p_uncond=cfg['p_uncond'], text=text, n_images=cfg['n_images'],
                             cache_dir=cfg['cache_dir'], video_frames=cfg['video_frames'])
    dataset.get('train', 0)  # fail on a bad mixture / block size before building anything big
    dataset.get('val', 0)    # builds the held-out latent cache too, before the other ranks read it
    if ddp and master:
        dist.barrier()
    model = Transfusion(mcfg).to(device)
    counts = model.count_params()
    sharded = ddp and cfg['fsdp']
    if sharded:  # FSDP2: each block is one unit of all-gather / reduce-scatter; before the optimizer sees them
        from torch.distributed.fsdp import fully_shard
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
    optimizer = model.configure_optimizer(cfg['learning_rate'], cfg['weight_decay'],
                                          (cfg['beta1'], cfg['beta2']), device.type)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    step = 0
    if cfg['init_from'] == 'resume':
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: init_from='resume' but there is no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(model, optimizer, model_state_dict=ckpt['model'], optim_state_dict=ckpt['optimizer'],
                           options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(ckpt['model'])
            optimizer.load_state_dict(ckpt['optimizer'])
        step = ckpt['step']
    elif cfg['init_from'] != 'scratch':
        raise SystemExit(f"error: init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")
    raw_model = model
    if cfg['compile']:
        model = torch.compile(model)
    if ddp and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)

    if master:
        os.makedirs(cfg['out_dir'], exist_ok=True)
        print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
              f"ffn={mcfg.ffn}, flow alpha={mcfg.alpha:.2f}, device={device}, dtype={dtype}, world={world}")
        log = open(os.path.join(cfg['out_dir'], 'log.jsonl'), 'a')

    def log_line(entry):
        if master:
            log.write(json.dumps(entry) + '\n')
            log.flush()

    stop = []  # SIGTERM (a scheduler's preemption): finish the step, save, exit cleanly
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    tokens_per_step = cfg['batch_size'] * cfg['block_size'] * cfg['grad_accum'] * world
    bar = tqdm(total=cfg['max_iters'], initial=step, disable=not master, dynamic_ncols=True)
    t_train, n_timed, grad_norm = 0.0, 0, torch.zeros(())
    while True:
        last = step == cfg['max_iters']
        if step % cfg['eval_interval'] == 0 or last:
            res = evaluate(raw_model, dataset, cfg['eval_batches'], device, ctx)
            if master:
                tqdm.write(f"step {step}: " + ', '.join(f"{k} {v:.4f}" for k, v in res.items()))
            log_line({'step': step, **res})
            if step > 0:
                save_checkpoint(ckpt_path, raw_model, optimizer, cfg, step, {'encoder': encoder.state_dict()},
                                sharded)
        if last:
            break

        if step % cfg['log_interval'] == 0:
            t_train, n_timed = 0.0, 0
        t_step = time.time()
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g['lr'] = lr
        sums = torch.zeros(3, device=device)  # lm, flow, total (micro-step averages)
        counts = 0
        for micro in range(cfg['grad_accum']):
            # global micro-batch index: 1 process x grad_accum 2 reads the same data (and draws the same t
            # and noise) as 2 processes x grad_accum 1, and a resumed run needs nothing but the step
            g = micro * world + rank
            torch.manual_seed(seed_of(cfg['seed'], step, g))
            batch = dataset.get('train', step, g).to(device)
            sync = not ddp or micro == cfg['grad_accum'] - 1  # all-reduce only on the last micro-step
            if sharded:
                raw_model.set_requires_gradient_sync(sync)
            with (nullcontext() if sync or sharded else model.no_sync()), ctx:
                loss, m = model(batch)
                (loss / cfg['grad_accum']).backward()
            sums += torch.stack([m['lm_loss'], m['flow_loss'], loss.detach()]) / cfg['grad_accum']
            counts = counts + m.get('counts', 0)
        if ddp:  # every rank sees the same averaged losses, so all take the same branch below
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        if not torch.isfinite(sums[2]):
            if not cfg['skip_nonfinite']:
                raise SystemExit(f"error: the loss is {sums[2].item()} at step {step}; stopping "
                                 f"(--skip_nonfinite=True skips such steps)")
            tqdm.write(f"step {step}: loss is {sums[2].item()}, step skipped")
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
            if hasattr(grad_norm, 'full_tensor'):  # FSDP: a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        t_train, n_timed = t_train + time.time() - t_step, n_timed + 1
        if step % cfg['log_interval'] == 0 or step == cfg['max_iters']:
            lm, fl, total = sums.tolist()
            bar.set_postfix(loss=f"{total:.3f}", lm=f"{lm:.3f}", flow=f"{fl:.3f}")
            entry = {'step': step, 'loss': total, 'lm_loss': lm, 'flow_loss': fl, 'lr': lr,
                     'grad_norm': grad_norm.item(), 'tokens_per_s': tokens_per_step * n_timed / t_train}
            if torch.is_tensor(counts):  # MoE load of this step, per layer: max expert load / mean (1 = even)
                load = counts.sum(1).float()
                entry['moe_max_load'] = (load.max(1).values / load.mean(1)).tolist()
                entry['moe_dead'] = (load == 0).sum(1).tolist()
            log_line(entry)
        if stop:
            save_checkpoint(ckpt_path, raw_model, optimizer, cfg, step, {'encoder': encoder.state_dict()}, sharded)
            if master:
                tqdm.write(f"SIGTERM: saved step {step} to {ckpt_path}; resume with --init_from=resume")
            break
    bar.close()
    if ddp:
        dist.barrier()   # rank 0 may still be writing the last checkpoint; tearing gloo down under it can abort
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
    if 'LOCAL_RANK' in os.environ:
        # under torchrun, once everything is saved and the process group destroyed, skip the interpreter's
        # teardown: gloo's worker threads can still hold tensors then, and freeing them during finalization
        # aborts the rank (SIGABRT, "terminate called without an active exception": seen in ~1 of 8 CI runs
        # of the 2-process FSDP test, after a complete run), which torchrun reports as a failed job
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
