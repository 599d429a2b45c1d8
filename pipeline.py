"""
A run's plumbing, shared by train.py, eval.py, sample.py and bench.py. A run is one flat config dict: the
knobs of data.py (what the batches are made of), model.py (the network) and rae.py (the encoder), plus the
script's own.

    tok, text = check(cfg)                      # every check that needs no long work, before any
    encoder = rae.build_encoder(cfg)            # minutes the first time, then read from cache_dir
    mcfg = model_config(cfg, tok, encoder)
    dataset = make_dataset(cfg, tok, encoder, text, seed)
    held_out_losses(model, dataset, n_batches)  # train.py's periodic eval and eval.py's numbers
    save_checkpoint(...), check_resume(ckpt, cfg, path), load_state(...), load_checkpoint(path, device)
"""

import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict

import tiktoken
import torch
import torch.distributed as dist

import data
import documents
import folders
import model
import rae
import shard_data
import tokenizer
from configurator import fail, save_atomic


def run_knobs():
    """Every knob a run's components read, with its default: what a checkpoint's config records."""
    return {**data.KNOBS, **model.KNOBS, **rae.KNOBS}


def help_sections():
    """--help's sections for the components' knobs: (title, keys, the file whose comments describe them)."""
    return [('data (data.py)', list(data.KNOBS), data.__file__), ('model (model.py)', list(model.KNOBS),
            model.__file__), ('encoder (rae.py)', list(rae.KNOBS), rae.__file__)]


def model_config(cfg, tok, d_latent, n_latent):
    try:
        return model.ModelConfig(**{k: cfg[k] for k in model.KNOBS}, vocab_size=cfg['vocab_size'] or tok.vocab_size,
                                 block_size=cfg['block_size'], d_latent=d_latent, n_latent=n_latent)
    except ValueError as e:
        fail(e)


def check(cfg):
    """All a run's checks that need no long work, before any (the RAE build, the latent caches): the knobs'
    values, the tokenizer, the mixture, the text source (read here: readable, UTF-8, not empty), and that
    block_size holds the longest document of every kind in the mixture. Returns (tokenizer, text or None);
    every problem is one sentence and exit status 1."""
    rae.check_knobs(cfg)
    for k in ('block_size', 'batch_size', 'n_images'):
        if cfg[k] < 1:
            fail(f"{k} must be at least 1, got {cfg[k]}")
    if cfg['video_frames'] < 2:
        fail(f"video_frames must be at least 2 (a clip predicts a frame from the ones before), got {cfg['video_frames']}")
    if not 0 <= cfg['p_uncond'] < 1 or not 0 <= cfg['action_drop'] < 1:
        fail(f"p_uncond and action_drop must be in [0, 1), got {cfg['p_uncond']}, {cfg['action_drop']}")
    try:
        kinds, _ = documents.parse_mixture(cfg['mixture'])
    except ValueError as e:
        fail(f"bad mixture: {e}")
    try:
        qa = documents.qa_options(cfg)
    except ValueError as e:
        fail(e)
    name = cfg['tokenizer']
    if name not in ('world', 'byte') and name not in tiktoken.list_encoding_names():
        fail(f"unknown tokenizer {name!r}: world, byte or a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())})")
    try:
        tok = tokenizer.get_tokenizer(name)
    except Exception as e:  # tiktoken fetches its file once; offline that fails in several ways
        fail(f"cannot load the {name} tokenizer ({type(e).__name__}: {e})")
    if cfg['vocab_size'] and cfg['vocab_size'] < tok.vocab_size:
        fail(f"vocab_size={cfg['vocab_size']} is smaller than the {name} tokenizer's {tok.vocab_size}")
    n_latent = rae.n_tokens(cfg)
    model_config(cfg, tok, 1, n_latent)  # the model knobs' values (the latent width is not known yet)
    text = None
    if cfg['text_source']:
        try:
            text = data.load_text(cfg['text_source'])
        except ValueError as e:
            fail(e)
    sharded = shard_data.check(cfg, kinds, tok, n_latent)   # shard documents are cut to fit too
    check_folders(cfg, kinds, tok, n_latent)
    world_kinds = [k for k in kinds if not (k == 'text' and text is not None)  # real text is cut to fit
                   and k not in sharded
                   and not (cfg['image_folder'] and k in ('caption2image', 'image2caption'))
                   and not (cfg['video_folder'] and k in ('video', 'action'))]
    for kind, n in documents.longest_documents(world_kinds, tok, n_latent, cfg['video_frames'], qa).items():
        if n > cfg['block_size']:
            hint = ' (or fewer video_frames)' if kind in ('video', 'action') else ''
            fail(f"block_size={cfg['block_size']} cannot hold a {kind} document (up to {n} tokens with "
                 f"{n_latent} latents per picture): use block_size >= {n}{hint}")
    return tok, text


def check_folders(cfg, kinds, tok, n_latent):
    """image_folder and video_folder: listed, captions and actions read, the mixture and block_size checked
    (the pictures and videos themselves are read by the first build of their caches)."""
    if cfg['video_fps'] < 0:
        fail(f"video_fps must not be negative, got {cfg['video_fps']}")
    if cfg['image_folder']:
        if 'qa' in kinds:
            fail("question documents need the world's scenes: with image_folder, the mixture may hold text, "
                 "caption2image, image2caption, video and action documents")
        if cfg['block_size'] < n_latent + 5:
            fail(f"block_size={cfg['block_size']} cannot hold a picture with a caption ({n_latent} latents + 5)")
        folders.open_images(cfg['image_folder'], cfg['image_size'], cfg['cache_dir'])
    if cfg['video_folder'] and ({'video', 'action'} & set(kinds)):
        vf = folders.open_videos(cfg['video_folder'], cfg['image_size'], cfg['cache_dir'], cfg['video_fps'])
        clip = cfg['video_frames'] * (n_latent + 2) + 2
        if 'action' in kinds:
            if not vf.actions:
                fail(f"action documents need videos with a .actions file (one action line per step) in "
                     f"{cfg['video_folder']}")
            clip += (cfg['video_frames'] - 1) * max((len(tok.encode(a)) for lines in vf.actions.values() for a in lines),
                                                    default=0)
        if clip > cfg['block_size']:
            fail(f"block_size={cfg['block_size']} cannot hold a clip of {cfg['video_frames']} frames from "
                 f"{cfg['video_folder']} (up to {clip} tokens): use block_size >= {clip} or fewer video_frames")


def make_dataset(cfg, tok, encoder, text, seed):
    images = folders.open_images(cfg['image_folder'], encoder.res, cfg['cache_dir']) if cfg['image_folder'] else None
    videos = (folders.open_videos(cfg['video_folder'], encoder.res, cfg['cache_dir'], cfg['video_fps'])
              if cfg['video_folder'] else None)
    streams = (shard_data.ShardData(cfg, tok, encoder.res, encoder.n_tokens, seed)
               if any(cfg[k] for k in shard_data.FORMATS) else None)
    return data.WorldData(tok, encoder, cfg['block_size'], cfg['batch_size'], cfg['mixture'], seed=seed,
                          p_uncond=cfg['p_uncond'], text=text, n_images=cfg['n_images'],
                          cache_dir=cfg['cache_dir'], video_frames=cfg['video_frames'], images=images,
                          videos=videos, shards=streams, qa=documents.qa_options(cfg),
                          action_drop=cfg['action_drop'])


@torch.no_grad()
def held_out_losses(net, dataset, n_batches, ctx=nullcontext(), t_grid=()):
    """Held-out losses, each on its own document kind so the numbers do not depend on the mixture: text loss
    on text documents, caption loss on image->caption, flow loss on caption->image (and on clips when the
    mixture has them), then the flow loss at each fixed t of t_grid. Noise and t are drawn from a fixed seed,
    so numbers at different steps and from different checkpoints compare. Keys: val_<name>_loss, val_text_ppl."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    kinds = [('text', 'text=1', 'lm_loss', None), ('caption', 'image2caption=1', 'lm_loss', None),
             ('flow', 'caption2image=1', 'flow_loss', None)]
    kinds += [(f'{k}_flow', f'{k}=1', 'flow_loss', None) for k in ('video', 'action') if k in dataset.kinds]
    kinds += [(f'flow_t{t:g}', 'caption2image=1', 'flow_loss', t) for t in t_grid]
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(0)
        for name, kind, key, t in kinds:
            losses = []
            for i in range(n_batches):
                batch = dataset.get('val', i, mixture=kind).to(device)
                with ctx:
                    losses.append(net(data.encode_pending(batch, dataset.encoder), t_fixed=t)[1][key].item())
            out[f'val_{name}_loss'] = sum(losses) / len(losses)
    out['val_text_ppl'] = math.exp(min(out['val_text_loss'], 700))  # exp overflows past ~709
    net.train(was_training)
    return out


# -----------------------------------------------------------------------------
# checkpoints

MODEL_SHAPE = ('d_model', 'n_layer', 'n_head', 'n_kv_head', 'd_ff', 'ffn', 'moe_experts', 'moe_top_k',
               'moe_d_expert', 'moe_shared', 'qk_norm', 'tokenizer', 'vocab_size')
# what a checkpoint written before a knob existed was built with (a later key otherwise takes today's default)
BEFORE_KNOB = {'encoder': 'pixel', 'decoder_dim': 96, 'qk_norm': False}


def weights_finite(net):
    """Are all of a model's parameters finite, on every rank (FSDP shards differ, so the ranks agree first)?"""
    local = lambda p: p.to_local() if hasattr(p, 'to_local') else p
    bad = torch.tensor([float(any(not torch.isfinite(local(p)).all() for p in net.parameters()))],
                       device=next(net.parameters()).device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad)
    return bad.item() == 0


def sharded_path(path):
    """An FSDP run's checkpoint is a folder beside where the single file would be: out/ckpt.pt -> out/ckpt."""
    path = str(path)
    return path[:-3] if path.endswith(".pt") else path


def save_checkpoint(path, raw_model, optimizer, cfg, step, extra, sharded=False):
    """Everything needed to resume (the data position and all randomness follow from the step). Whole: one
    file written by rank 0 to a temp file and renamed. Sharded (FSDP): a torch.distributed.checkpoint folder
    (sharded_path) in which every rank writes its own shards, nothing gathered, with the rest (config, step,
    encoder) in its meta.pt; written as folder.tmp, then swapped in. Either way a crash during the write leaves
    the previous checkpoint intact. A model whose weights are not finite is never saved: the run stops with a
    sentence. Call it on every rank."""
    if not weights_finite(raw_model):
        fail(f"the weights are not finite at step {step}: not saving them over {path} (a learning rate too "
             f"high? resume from the last good checkpoint with a lower one)")
    meta = {'config': cfg, 'model_config': asdict(raw_model.cfg), 'step': step, **extra}
    master = int(os.environ.get('RANK', 0)) == 0
    if not sharded:
        if master:
            save_atomic({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), **meta}, path)
        return
    import torch.distributed.checkpoint as dcp   # here, as below: importing it takes ~1 s at every start
    from torch.distributed.checkpoint.state_dict import get_state_dict
    folder = sharded_path(path)
    model_sd, optim_sd = get_state_dict(raw_model, optimizer)
    if master:
        shutil.rmtree(folder + '.tmp', ignore_errors=True)
    dist.barrier()
    dcp.save({'model': model_sd, 'optimizer': optim_sd}, checkpoint_id=folder + '.tmp')
    if master:
        torch.save(meta, os.path.join(folder + '.tmp', 'meta.pt'))
        if os.path.isdir(folder):
            os.replace(folder, folder + '.old')
        os.replace(folder + '.tmp', folder)
        shutil.rmtree(folder + '.old', ignore_errors=True)
    dist.barrier()


def read_checkpoint(path, device='cpu'):
    """A train.py checkpoint's contents, with one sentence when it is missing or is not one: the whole file
    loaded, or for a sharded folder its meta.pt with 'dcp' naming the folder (load_state reads the tensors into
    a live model)."""
    folder = next((f for f in (sharded_path(path), sharded_path(path) + '.old') if os.path.isdir(f)), None)
    if not os.path.isfile(path) and folder is None:
        fail(f"no checkpoint at {path} (train one first: python train.py)")
    try:
        ck = (torch.load(path, map_location=device, weights_only=True) if os.path.isfile(path) else
              {**torch.load(os.path.join(folder, 'meta.pt'), map_location=device, weights_only=True), 'dcp': folder})
    except Exception as e:  # truncated, foreign, or made by another program: torch raises many types
        fail(f"{path} is not a compatible checkpoint ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(ck, dict) or not {'config', 'model_config', 'step'} <= set(ck) or not {'model', 'dcp'} & set(ck):
        fail(f"{path} is not a compatible checkpoint (not a train.py checkpoint: no model, config and step)")
    return ck


def load_state(model, optimizer, ck):
    """Put a checkpoint's weights (and optimizer state, if an optimizer is given) into a live model, sharded or
    whole. A sharded checkpoint loads into any number of processes, FSDP or not (torch.distributed.checkpoint
    reads each rank's part of every tensor)."""
    if 'dcp' not in ck:
        model.load_state_dict(ck['model'])
        if optimizer is not None:
            optimizer.load_state_dict(ck['optimizer'])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if optimizer is None:
        state = {'model': model.state_dict()}
        dcp.load(state, checkpoint_id=ck['dcp'])
        model.load_state_dict(state['model'])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {'model': model_sd, 'optimizer': optim_sd}
    dcp.load(state, checkpoint_id=ck['dcp'])
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'])


def check_resume(ck, cfg, path):
    """Refuse to resume a checkpoint whose model shape, tokenizer, encoder or optimizer differ from this run's
    config (the weights would not load, or would continue in another latent space), naming every differing
    knob, or a whole-file checkpoint into FSDP shards. Everything else (steps, learning rate, mixture, the
    number of processes, ...) may change on resume."""
    old = {**run_knobs(), **BEFORE_KNOB, **ck['config']}
    keys = [*MODEL_SHAPE, *rae.identity_knobs(cfg), 'optimizer']
    differ = [k for k in keys if k in cfg and old.get(k, cfg[k]) != cfg[k]]
    if differ:
        fail(f"cannot resume {path}: it was trained with " + ', '.join(f"{k}={old[k]!r}" for k in differ)
             + ", this run has " + ', '.join(f"{k}={cfg[k]!r}" for k in differ)
             + " (pass the checkpoint's values, or start in another out_dir)")
    if 'dcp' not in ck and cfg.get('fsdp') and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        fail(f"cannot resume {path} with fsdp=True: it is a whole-model file from a run without FSDP, and only "
             f"sharded checkpoints load into shards (resume it with fsdp=False, or start in another out_dir)")


def check_same_encoder(ck, encoder, path):
    """After the build: the encoder of this run must be the checkpoint's, tensor for tensor (its knobs agreed,
    so only a change in the building code can make them differ). The decoder may differ."""
    saved = {k: v for k, v in ck['encoder'].items() if not k.startswith('decoder.')}
    built = {k: v for k, v in encoder.state_dict().items() if not k.startswith('decoder.')}
    if saved.keys() != built.keys() or any(not torch.equal(saved[k].cpu(), built[k].cpu()) for k in saved):
        fail(f"cannot resume {path}: the {encoder.name} encoder built for this config differs from the "
             f"checkpoint's (the RAE code changed since?); start in another out_dir")


def load_checkpoint(path, device='cpu'):
    """(model, tokenizer, encoder, train config) from a train.py checkpoint (a file or a sharded folder), with
    one clear error if it is missing or does not fit the model it describes."""
    ck = read_checkpoint(path, device)
    cfg = {**run_knobs(), **BEFORE_KNOB, **ck['config']}
    try:
        mcfg = model.ModelConfig(**{'qk_norm': BEFORE_KNOB['qk_norm'], **ck['model_config']})
        tok = tokenizer.get_tokenizer(cfg['tokenizer'])
        encoder = rae.build_encoder(cfg, fit=False)  # the checkpoint brings the encoder's statistics
        net = model.Transfusion(mcfg).to(device)
        load_state(net, None, ck)
        encoder.load_state_dict(ck['encoder'])
    except (KeyError, RuntimeError, TypeError, ValueError, SystemExit) as e:
        fail(f"{path} is not a compatible checkpoint ({type(e).__name__}: {str(e)[:200]})")
    return net.eval(), tok, encoder.to(device), cfg
