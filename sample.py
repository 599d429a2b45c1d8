"""
Sample from a trained checkpoint: text continuation, text -> image, image -> text, interleaved generation
where the model itself opens a picture with <BOI> (docs/paper.md §3), and world-model rollouts. The sampling
itself lives in generate.py.

    python sample.py                                          # every mode, from out/ckpt.pt, into out/samples/
    python sample.py --mode=t2i --prompt="a large red circle at the center." --n=8
    python sample.py --mode=i2t --image=picture.png
    python sample.py --mode=i2t --prompt="q: how many objects are there? a:"   # a question about the picture
    python sample.py --mode=text --prompt="there are"
    python sample.py --help                                   # every knob
"""

import os
import sys

import imageio.v3 as iio
import numpy as np
import torch

import data
import documents
import folders
import video
import world
from configurator import configure, fail, knobs, resolve_device
from generate import generate, rollout, text_to_image
from pipeline import load_checkpoint
from data import to_uint8

# -----------------------------------------------------------------------------
ckpt = 'out/ckpt.pt'      # the checkpoint to sample from
out_dir = ''              # '' = <checkpoint folder>/samples
mode = 'all'              # all | text | t2i | i2t | interleaved | rollout
prompt = ''               # text to continue, caption to draw, or question about the picture ('' = a world one)
actions = ''              # rollout: ';'-separated, e.g. 'right x2, up; action: dx=+1, dy=0' ('' = a held-out walk's)
image = ''                # i2t: a PNG/JPEG file; '' = a held-out world picture
n = 8                     # t2i: pictures per prompt
steps = 25                # Euler steps per picture (docs/paper.md §3)
cfg_scale = 3.0           # classifier-free guidance scale (docs/paper.md §4); 1 = none
temperature = 0.0         # text sampling temperature; 0 = greedy
top_k = 0                 # 0 = no top-k filter
max_new_tokens = 120      # text tokens to generate at most
seed = 0                  # the sampling seed
device = 'auto'           # auto | cpu | cuda | cuda:N
cache = True              # KV cache (False: recompute the whole sequence every step)
# -----------------------------------------------------------------------------
MODES = ('all', 'text', 't2i', 'i2t', 'interleaved', 'rollout')


def check_knobs(cfg):
    if cfg['mode'] not in MODES:
        fail(f"mode must be {', '.join(MODES[:-1])} or {MODES[-1]}, got {cfg['mode']!r}")
    if cfg['steps'] < 1 or cfg['n'] < 1 or cfg['max_new_tokens'] < 1:
        fail("steps, n and max_new_tokens must be at least 1")
    if cfg['cfg_scale'] < 0 or cfg['temperature'] < 0 or cfg['top_k'] < 0:
        fail("cfg_scale, temperature and top_k must not be negative")


def save_grid(path, images, cols=8, scale=4):
    """uint8 [B, H, W, 3] -> one PNG, images side by side (nearest-neighbour upscaled for viewing)."""
    B, H, W, _ = images.shape
    cols = min(cols, B)
    rows = -(-B // cols)
    grid = np.zeros((rows * (H + 1) + 1, cols * (W + 1) + 1, 3), np.uint8) + 255
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = img
    iio.imwrite(path, grid.repeat(scale, 0).repeat(scale, 1))


def read_image(path, res):
    """A picture file of any bit depth or mode -> float [1, 3, res, res]; a clear error for unreadable files
    or the wrong size."""
    try:
        img = data.to_rgb8(iio.imread(path))
    except Exception as e:  # imageio raises many types for a bad file
        fail(f"cannot read image {path}: {e}")
    if img.shape[:2] != (res, res):
        fail(f"image {path} is {img.shape[1]}x{img.shape[0]}; this model reads {res}x{res}")
    return data.image_tensor([img])


def write_rollout(model, tok, encoder, actions, path, steps, seed, context=4):
    """A held-out walk's first `context` frames, then the model's frames for `actions` (';'-separated text,
    numeric or words; '' = the walk's own next 4 actions), as a GIF: the model above, the true world below."""
    map_id, frames, walk, positions = video.heldout_walk(np.random.default_rng([seed, 9]), context + 4)
    own = [video.format_action(*a) for a in walk[context - 1:]]
    texts = [a.strip() for a in actions.split(';')] if actions else own
    try:
        moves = [video.parse_action(a) for a in texts]
    except ValueError as e:
        fail(e)
    (x, y), truth = positions[context - 1], list(frames[:context])
    for dx, dy in moves:
        x, y = x + dx, y + dy
        try:
            truth.append(video.view(video.make_map(map_id), x, y))
        except ValueError:
            fail(f"the actions {actions!r} walk off the map (to x={x}, y={y})")
    device = next(model.parameters()).device
    z = encoder.encode(data.image_tensor(documents.at_res(frames[:context], encoder.res)).to(device))[None]
    try:
        pred = rollout(model, tok, z, [video.format_action(*a) for a in walk[:context - 1]] + texts, steps, seed)[0]
    except ValueError as e:
        fail(e)
    top = np.concatenate([frames[:context], documents.at_res(to_uint8(encoder.decode(pred)), world.RES)])
    video.write_gif(path, np.concatenate([top, np.stack(truth)], axis=1), fps=2, scale=4)


def main(argv):
    cfg = configure(knobs(globals()), argv, __doc__)
    check_knobs(cfg)
    dev = resolve_device(cfg['device'])
    model, tok, encoder, tcfg = load_checkpoint(cfg['ckpt'], dev)
    out = cfg['out_dir'] or os.path.join(os.path.dirname(cfg['ckpt']) or '.', 'samples')
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng([cfg['seed'], 7])
    kw = dict(steps=cfg['steps'], cfg_scale=cfg['cfg_scale'], seed=cfg['seed'], use_cache=cfg['cache'])
    gen = dict(max_new_tokens=cfg['max_new_tokens'], temperature=cfg['temperature'], top_k=cfg['top_k'], **kw)
    longest = model.cfg.block_size - model.cfg.n_latent - 4
    if len(tok.encode(cfg['prompt'])) > longest:
        fail(f"the prompt is {len(tok.encode(cfg['prompt']))} tokens; this model's context leaves room for "
             f"{longest} before an image")

    def text_of(ids):
        return tok.decode([i for i in ids.tolist() if i >= 0])

    if cfg['mode'] in ('all', 'text'):
        prompt = cfg['prompt'] or 'there is'
        ids, _ = generate(model, tok, [prompt], **gen)
        print(f"[text] {prompt!r} -> {text_of(ids[0])!r}")
    # a model of your pictures draws and reads held-out ones of its folder; a world model, world scenes
    own = (folders.open_images(tcfg['image_folder'], encoder.res, tcfg['cache_dir']).pictures('val')
           if tcfg['image_folder'] else None)
    if cfg['mode'] in ('all', 't2i'):
        prompts = ([cfg['prompt']] if cfg['prompt'] else own[1][:4] if own else
                   [world.caption(world.sample_scene(rng, 1), rng) for _ in range(4)])
        rows = []
        for i, p in enumerate(prompts):
            z = text_to_image(model, tok, p, B=cfg['n'], **kw)
            rows.append(to_uint8(encoder.decode(z)))
            print(f"[t2i] row {i}: {p!r}")
        path = os.path.join(out, 't2i.png')
        save_grid(path, np.concatenate(rows), cols=cfg['n'])
        print(f"[t2i] wrote {path}")
    if cfg['mode'] in ('all', 'i2t'):
        if cfg['image'] and own:
            try:
                images, truth = data.image_tensor([folders.read_picture(cfg['image'], encoder.res)]), None
            except Exception as e:  # imageio raises many types for a bad file
                fail(f"cannot read image {cfg['image']}: {e}")
        elif cfg['image']:
            images, truth = read_image(cfg['image'], encoder.res), None
        elif own:
            images, truth = data.image_tensor(own[0][:1]), own[1][0]
        else:
            scene = world.sample_scene(rng)
            images, truth = data.image_tensor([world.render(scene, encoder.res, rng=rng)]), scene
        z = encoder.encode(images.to(dev))[0]
        # after the picture, the prompt (a question, as qa documents write it) or nothing (a caption, or the
        # model's own question: it writes whichever of its training documents it finds likelier)
        asked = cfg['prompt'] if cfg['mode'] == 'i2t' else ''
        ids, _ = generate(model, tok, [documents.Visual(None, False, z)] + ([asked] if asked else []), **gen)
        print(f"[i2t] {asked!r} -> {text_of(ids[0])!r}" + (f"  (truth: {truth})" if truth else ''))
    if cfg['mode'] in ('all', 'interleaved'):
        prompt = cfg['prompt'] or (own[1][0] if own else world.caption(world.sample_scene(rng, 1), rng))
        ids, images = generate(model, tok, [prompt], **gen)
        print(f"[interleaved] {prompt!r} -> {text_of(ids[0])!r} with {len(images)} image(s)")
        if images:
            path = os.path.join(out, 'interleaved.png')
            save_grid(path, to_uint8(encoder.decode(torch.cat(images))))
            print(f"[interleaved] wrote {path}")
    world_actions = 'action' in documents.parse_mixture(tcfg['mixture'])[0] and not tcfg['video_folder']
    if cfg['mode'] == 'rollout' or (cfg['mode'] == 'all' and world_actions):
        path = os.path.join(out, 'rollout.gif')
        write_rollout(model, tok, encoder, cfg['actions'], path, cfg['steps'], cfg['seed'])
        print(f"[rollout] wrote {path} (top: the model, bottom: the true world)")


if __name__ == '__main__':
    main(sys.argv[1:])
