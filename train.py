"""
Train the interleaved text + image model (nanoGPT style).

    python train.py                                  # the CPU default on the embedded world
    python train.py config/smoke.py                  # a config file ...
    python train.py config/smoke.py --max_iters=50   # ... and --key=value overrides (type-checked)
    python train.py --help                           # every knob, its default and what it does
    torchrun --standalone --nproc_per_node=2 train.py  # DDP (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=8 train.py config/paper_modality.py   # FSDP2 (parallel.py), sharded checkpoints
    python train.py config/paper_moe256.py --meta=True --gpus=8     # parameters and memory per GPU, nothing built

The knobs are this file's (the optimiser, the schedule, the loop) and those of the components it builds:
data.py (what the batches hold), model.py (the network), rae.py (the encoder). Every value is checked, and
every check that needs no long work runs before any (pipeline.check): a mistake costs seconds, not an RAE build.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import documents
import memory
import parallel
import pipeline
import rae
import shard_data
from configurator import configure, fail, json_line, knobs, precision, seed_of
from loader import Loader
from model import Transfusion
from optim import configure_optimizer
from shards import DataError

# -----------------------------------------------------------------------------
# knobs of the run (config/default.py writes out the default run, components' knobs included)
out_dir = 'out'           # the checkpoint (ckpt.pt; under FSDP the sharded folder ckpt/) and the log (log.jsonl)
init_from = 'scratch'     # scratch | resume (from out_dir/ckpt.pt)
seed = 1337               # weights, batches, t and noise all follow from it
device = 'auto'           # auto | cpu | cuda | cuda:N
dtype = 'auto'            # auto (bf16 on CUDA and CPUs with native bf16, else fp32) | float32 | bfloat16
grad_accum = 1            # micro-batches per step (each batch_size rows, per process)
data_workers = -1         # background processes building the next batches (loader.py); -1: 4 on CUDA, 0 on CPU
# optimiser (Transfusion's AdamW settings, docs/paper.md §5; optim.py)
optimizer = 'adamw'       # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
learning_rate = 1e-3      # peak learning rate (AdamW)
muon_lr = 0.02            # optimizer=muon: peak learning rate of the Muon matrices
min_lr = 1e-4             # the schedule ends here
warmup_iters = 100        # linear warmup steps
max_iters = 2200          # optimizer steps
lr_decay_iters = 0        # 0 = max_iters; the schedule reaches min_lr here (larger: stop part-way down a longer one)
schedule = 'cosine'       # cosine (warmup, cosine decay) | wsd (warmup, stable, then a linear cooldown)
cooldown = 0.4            # schedule=wsd: the share of the steps (after warmup) spent cooling down to min_lr
weight_decay = 0.1        # AdamW weight decay on matrices
beta1 = 0.9               # AdamW beta1
beta2 = 0.95              # AdamW beta2
grad_clip = 1.0           # clip the global gradient norm to this (0 = no clipping)
# eval, logging, checkpoints
eval_interval = 200       # held-out losses and a checkpoint every this many steps
eval_batches = 4          # held-out batches per document kind
log_interval = 10         # a log.jsonl line every this many steps
skip_nonfinite = False    # True: skip a step whose loss or gradient is NaN/inf (nothing updates); else stop there
compile = False           # torch.compile each transformer block
fsdp = False              # under torchrun: shard weights, grads and optimizer state with FSDP2 instead of DDP
meta = False              # True: build the model on the meta device, print its parameters and memory per GPU, exit
gpus = 8                  # meta=True: plan the memory for this many GPUs
gpu_gb = 80.0             # meta=True: of this many GB each
# -----------------------------------------------------------------------------
MAX_SKIPS = 10            # skip_nonfinite: this many skipped steps in a row stop the run (it will not recover)


def lr_at(it, cfg):
    """Linear warmup, then down to min_lr at lr_decay_iters (0: max_iters): a cosine, or (wsd) constant until
    the last `cooldown` share of the steps and a straight line from there."""
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / cfg['warmup_iters']
    end = cfg['lr_decay_iters'] or cfg['max_iters']
    progress = min(1.0, (it - cfg['warmup_iters']) / max(1, end - cfg['warmup_iters']))
    if cfg['schedule'] == 'wsd':
        down = max(0.0, progress - (1 - cfg['cooldown'])) / cfg['cooldown']
        return cfg['learning_rate'] - down * (cfg['learning_rate'] - cfg['min_lr'])
    return cfg['min_lr'] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg['learning_rate'] - cfg['min_lr'])


def check_loop_knobs(cfg):
    for k in ('max_iters', 'grad_accum', 'eval_interval', 'eval_batches', 'log_interval'):
        if cfg[k] < 1:
            fail(f"{k} must be at least 1, got {cfg[k]}")
    if cfg['data_workers'] < -1 or cfg['gpus'] < 1 or cfg['gpu_gb'] <= 0:
        fail("data_workers must be -1 (auto) or more, gpus and gpu_gb positive")
    if cfg['learning_rate'] <= 0 or cfg['min_lr'] < 0 or cfg['warmup_iters'] < 0 or cfg['lr_decay_iters'] < 0:
        fail("learning_rate must be positive; min_lr, warmup_iters and lr_decay_iters not negative")
    if cfg['grad_clip'] < 0 or cfg['weight_decay'] < 0 or not (0 <= cfg['beta1'] < 1 and 0 <= cfg['beta2'] < 1):
        fail("grad_clip and weight_decay must not be negative, beta1 and beta2 must lie in [0, 1)")
    if cfg['optimizer'] not in ('adamw', 'muon'):
        fail(f"optimizer must be adamw or muon, got {cfg['optimizer']!r}")
    if cfg['optimizer'] == 'muon' and (cfg['fsdp'] or cfg['muon_lr'] <= 0):
        fail("optimizer=muon needs a positive muon_lr and whole matrices (not fsdp=True)")
    if cfg['optimizer'] != 'muon' and cfg['muon_lr'] != muon_lr:   # a knob that would change nothing
        fail(f"muon_lr is Muon's rate and this run's optimizer is {cfg['optimizer']}: add --optimizer=muon or "
             "leave muon_lr out")
    if cfg['schedule'] not in ('cosine', 'wsd') or not 0 < cfg['cooldown'] <= 1:
        fail(f"schedule must be cosine or wsd and cooldown in (0, 1], got {cfg['schedule']!r}, {cfg['cooldown']}")
    if cfg['init_from'] not in ('scratch', 'resume'):
        fail(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")


def count_only(cfg, tok):
    """--meta=True: the parameters, and the memory per GPU on `gpus` GPUs of `gpu_gb` (memory.py), without
    allocating a byte; and how many such GPUs the config needs under FSDP."""
    encoder = rae.build_encoder(cfg, fit=False)
    mcfg = pipeline.model_config(cfg, tok, encoder.d_latent, encoder.n_tokens)
    with torch.device('meta'):
        net = Transfusion(mcfg)
    counts = net.count_params()
    print(f"{mcfg.ffn} model, d_model {mcfg.d_model} x {mcfg.n_layer} layers: {counts['total'] / 1e9:.3f}B "
          f"parameters, {counts['active'] / 1e9:.3f}B active per token; {counts['paper_active'] / 1e9:.3f}B "
          f"paper-active (without routers and latent adapters, as docs/paper.md §1 counts)")
    share = documents.text_share(cfg['mixture'], tok, mcfg.n_latent, cfg['video_frames'])
    plan = lambda n: memory.plan(net, {**cfg, 'fsdp': cfg['fsdp'] or n > 1}, n, share)
    print(f"memory (fsdp={cfg['fsdp']}, {cfg['batch_size']} x {cfg['block_size']} tokens a GPU, text {share:.0%} "
          f"of them): " + memory.report(plan(cfg['gpus']), cfg['gpus'], cfg['gpu_gb']))
    fits = next((n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if plan(n)['total'] <= cfg['gpu_gb'] * memory.GB),
                None)
    print(f"with FSDP it needs at least {fits} GPU{'s' if fits > 1 else ''} of {cfg['gpu_gb']:g} GB" if fits else
          f"it does not fit 512 GPUs of {cfg['gpu_gb']:g} GB at this batch: lower batch_size")


def check_fits(net, cfg, tok, run):
    """On CUDA, before any long work: refuse a launch whose memory estimate exceeds the GPU, naming it."""
    if run.device.type != 'cuda':
        return
    share = documents.text_share(cfg['mixture'], tok, net.cfg.n_latent, cfg['video_frames'])
    need = memory.plan(net, {**cfg, 'fsdp': run.sharded, 'dtype': run.dtype}, run.world, share)
    have = torch.cuda.get_device_properties(run.device).total_memory
    if need['total'] > have:
        fail(f"this launch needs ~{need['total'] / memory.GB:.1f} GB a GPU and the GPU has "
             f"{have / memory.GB:.1f} GB: " + memory.report(need, run.world, have / memory.GB)
             + " (more GPUs with fsdp=True, or a smaller batch_size)")


def train_step(model, optimizer, batches, position, run):
    """One optimizer step at data position `position` (its grad_accum micro-batches are the next ones of
    `batches`, a loader.Loader; run: the parallel.Setup): the gradient norm, and the update only if the loss
    and the gradient norm are finite on every rank (a skipped step changes nothing). Returns (lm, flow, total
    losses as a tensor, MoE counts or 0, grad norm, whether it was applied). The one wait on the device per
    step is that finiteness check, before the update."""
    cfg = run.cfg
    sums = torch.zeros(3, device=run.device)  # lm, flow, total (micro-step averages)
    counts = 0
    for micro in range(cfg['grad_accum']):
        # global micro-batch index: 1 process x grad_accum 2 reads the same data (and draws the same t and
        # noise) as 2 processes x grad_accum 1, and a resumed run needs nothing but the position
        g = micro * run.world + run.rank
        torch.manual_seed(seed_of(cfg['seed'], position, g))
        at, m, batch = next(batches)
        assert (at, m) == (position, micro), f"the loader is at {(at, m)}, the step at {(position, micro)}"
        run.streams.update(batch.streams or {})   # shard readers: where each stands after this batch
        batch = batch.to(run.device)
        sync = not run.ddp or micro == cfg['grad_accum'] - 1  # all-reduce only on the last micro-step
        if run.sharded:
            model.set_requires_gradient_sync(sync)
        with (nullcontext() if sync or run.sharded else model.no_sync()), run.ctx:
            loss, m = model(data.encode_pending(batch, run.encoder))
            (loss / cfg['grad_accum']).backward()
        sums += torch.stack([m['lm_loss'], m['flow_loss'], loss.detach()]) / cfg['grad_accum']
        counts = counts + m.get('counts', 0)
    if run.ddp:  # every rank sees the same averaged losses, so all take the same branch below
        dist.all_reduce(sums, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or math.inf)
    if hasattr(grad_norm, 'full_tensor'):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    ok = bool(torch.isfinite(sums[2]) & torch.isfinite(grad_norm))  # (the norm is over all-reduced grads)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, counts, grad_norm, ok


def build(cfg, tok, text, ck, run):
    """The encoder (built by rank 0 first), the dataset and its caches, the model (initialised, sharded,
    compiled as asked) and its optimizer, the checkpoint's state loaded into them. -> (encoder, dataset,
    model, optimizer)."""
    def encoder_and_data():
        encoder = rae.build_encoder(cfg)
        dataset = pipeline.make_dataset(cfg, tok, encoder, text, cfg['seed'])
        dataset.build_caches()  # before the other ranks read them, and before any background worker starts
        return encoder, dataset
    encoder, dataset = run.after_rank0(encoder_and_data)
    rae.check_width(cfg['d_model'], encoder)
    if ck is not None:
        pipeline.check_same_encoder(ck, encoder, os.path.join(cfg['out_dir'], 'ckpt.pt'))
    run.encoder = encoder.to(run.device)
    mcfg = pipeline.model_config(cfg, tok, encoder.d_latent, encoder.n_tokens)
    with torch.device('meta'):
        check_fits(Transfusion(mcfg), cfg, tok, run)
    model = parallel.build_model(mcfg, run)
    optimizer = configure_optimizer(model, cfg['optimizer'], cfg['learning_rate'], cfg['muon_lr'],
                                    cfg['weight_decay'], (cfg['beta1'], cfg['beta2']), run.device.type)
    if ck is not None:
        pipeline.load_state(model, optimizer, ck)
    return encoder, dataset, model, optimizer


def loader_workers(cfg, device):
    """data_workers, with -1 resolved: 4 background processes on CUDA, none on a CPU."""
    return cfg['data_workers'] if cfg['data_workers'] >= 0 else 4 if device.type == 'cuda' else 0


def stream_layout(cfg, run):
    """What the shard readers' states depend on (shard_data.layout), or None for a run without shards."""
    if not any(cfg[k] for k in shard_data.FORMATS):
        return None
    return shard_data.layout(cfg, run.world * cfg['grad_accum'], max(1, loader_workers(cfg, run.device)))


def main(argv):
    defaults = {**pipeline.run_knobs(), **knobs(globals())}
    sections = [('run (train.py)', list(knobs(globals())), __file__), *pipeline.help_sections()]
    cfg = configure(defaults, argv, __doc__, sections)
    check_loop_knobs(cfg)
    tok, text = pipeline.check(cfg)
    if cfg['meta']:
        return count_only(cfg, tok)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ck = None
    if cfg['init_from'] == 'resume':  # before any long work: is the checkpoint there, and this run's?
        ck = pipeline.read_checkpoint(ckpt_path)
        pipeline.check_resume(ck, cfg, ckpt_path)
        if ck['step'] >= cfg['max_iters']:
            fail(f"{ckpt_path} is already at step {ck['step']}, max_iters={cfg['max_iters']}: raise max_iters "
                 f"to train further")
    run = parallel.setup(cfg)
    if ck is not None and stream_layout(cfg, run) is not None:  # shard readers continue exactly, or not at all
        shard_data.check_layout(ck.get('stream_layout'), stream_layout(cfg, run), ckpt_path)
    streams = ck.get('streams', {}) if ck is not None else {}
    run.dtype, run.ctx = precision(cfg['dtype'], run.device)
    # bit-identical reruns and resumes on CPU: embedding / index_put backward otherwise sum in thread order
    torch.use_deterministic_algorithms(run.device.type == 'cpu')
    encoder, dataset, raw_model, optimizer = build(cfg, tok, text, ck, run)
    step, skipped = (ck['step'], ck.get('skipped', 0)) if ck is not None else (0, 0)
    ck = None  # applied: the loaded tensors are not kept for the whole run
    model = raw_model
    if run.ddp and not run.sharded:
        model = DDP(raw_model, device_ids=[run.device.index] if run.device.type == 'cuda' else None)
    try:
        loop(cfg, run, encoder, dataset, model, raw_model, optimizer, step, skipped, streams)
    except DataError as e:   # shards past shard_max_bad, or nothing left to read: one sentence
        fail(e)
    if run.ddp:
        dist.barrier()   # rank 0 may still be writing the last checkpoint; tearing gloo down under it can abort
        dist.destroy_process_group()


def loop(cfg, run, encoder, dataset, model, raw_model, optimizer, step, skipped, streams=None):
    """Train from `step` to max_iters: held-out losses and a checkpoint every eval_interval steps, a log line
    every log_interval; a SIGTERM on any rank makes every rank finish its step, save and stop. streams: the
    checkpoint's shard reader states, where the readers continue."""
    master = run.rank == 0
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if master:
        os.makedirs(cfg['out_dir'], exist_ok=True)
        counts = raw_model.count_params()
        print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
              f"ffn={raw_model.cfg.ffn}, flow alpha={raw_model.cfg.alpha:.2f}, device={run.device}, "
              f"dtype={run.dtype}, world={run.world}{' (fsdp)' if run.sharded else ''}")
        log = open(os.path.join(cfg['out_dir'], 'log.jsonl'), 'a')

    def log_line(entry):
        if master:
            log.write(json_line(entry) + '\n')
            log.flush()

    layout = stream_layout(cfg, run)
    run.streams = {}   # this rank's readers, as the batches it trained on left them

    def save():
        extra = {'encoder': encoder.state_dict(), 'skipped': skipped}
        if layout is not None:   # every rank's readers, over the checkpoint's (for those not advanced since)
            extra.update(streams={**(streams or {}), **run.gather_streams()}, stream_layout=layout)
        pipeline.save_checkpoint(ckpt_path, raw_model, optimizer, cfg, step, extra, run.sharded)

    workers = loader_workers(cfg, run.device)
    batches = Loader(dataset, step + skipped, cfg['grad_accum'], run.world, run.rank, workers,
                     pin=run.device.type == 'cuda', streams=streams)
    stop = []  # SIGTERM (a scheduler's preemption): finish the step, save, exit cleanly
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    tokens_per_step = cfg['batch_size'] * cfg['block_size'] * cfg['grad_accum'] * run.world
    bar = tqdm(total=cfg['max_iters'], initial=step, disable=not master, dynamic_ncols=True)
    t_train, n_timed, in_a_row = 0.0, 0, 0
    while True:
        last = step == cfg['max_iters']
        if (step % cfg['eval_interval'] == 0 and in_a_row == 0) or last:
            res = pipeline.held_out_losses(raw_model, dataset, cfg['eval_batches'], run.ctx)
            if master:
                tqdm.write(f"step {step}: " + ', '.join(f"{k} {v:.4f}" for k, v in res.items()))
            log_line({'step': step, **res})
            if step > 0:
                save()
        if last:
            break

        if step % cfg['log_interval'] == 0:
            t_train, n_timed = 0.0, 0
        t_step = time.time()
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g['lr'] = lr * g.get('lr_scale', 1.0)  # (checkpoints from before optim.py have no lr_scale)
        sums, moe_counts, grad_norm, ok = train_step(model, optimizer, batches, step + skipped, run)
        if not ok:
            what = f"the loss is {sums[2].item()} and the gradient norm {grad_norm.item()} at step {step}"
            if not cfg['skip_nonfinite']:
                fail(f"{what}; stopping before the update (--skip_nonfinite=True skips such steps; the last "
                     f"checkpoint is untouched)")
            skipped, in_a_row = skipped + 1, in_a_row + 1
            tqdm.write(f"{what}: step skipped, nothing updated ({in_a_row} in a row)")
            if in_a_row >= MAX_SKIPS:
                fail(f"{MAX_SKIPS} steps in a row were not finite (the last at step {step}); stopping, the last "
                     f"checkpoint is untouched")
            continue
        in_a_row = 0
        step += 1
        bar.update(1)
        t_train, n_timed = t_train + time.time() - t_step, n_timed + 1
        if step % cfg['log_interval'] == 0 or step == cfg['max_iters']:
            lm, fl, total = sums.tolist()
            bar.set_postfix(loss=f"{total:.3f}", lm=f"{lm:.3f}", flow=f"{fl:.3f}")
            entry = {'step': step, 'loss': total, 'lm_loss': lm, 'flow_loss': fl, 'lr': lr,
                     'grad_norm': grad_norm.item(), 'tokens_per_s': tokens_per_step * n_timed / t_train}
            if layout is not None:   # this rank's readers: samples skipped as unusable so far
                entry['bad_samples'] = sum(s['bad'] for s in run.streams.values())
            if torch.is_tensor(moe_counts):  # MoE load of this step, per layer: max expert load / mean (1 = even)
                load = moe_counts.sum(1).float()
                entry['moe_max_load'] = (load.max(1).values / load.mean(1)).tolist()
                entry['moe_dead'] = (load == 0).sum(1).tolist()
            log_line(entry)
        if run.agree(stop) and step < cfg['max_iters']:
            save()
            if master:
                tqdm.write(f"SIGTERM: saved step {step} to {ckpt_path}; resume with --init_from=resume")
            break
    bar.close()


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
