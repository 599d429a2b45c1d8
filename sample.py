"""
Sample from a trained checkpoint: text continuation, text -> image, image -> text, and interleaved generation
where the model itself opens an image with <BOI> (PAPER.md §3: generate text until <BOI>, append N noise
latents, run Euler steps with CFG, append <EOI>, resume the text; the clean latents are fed back as context).

    python sample.py                                          # every mode, from out/ckpt.pt, into out/samples/
    python sample.py --mode=t2i --prompt="a large red circle at the center." --n=8
    python sample.py --mode=i2t --image=picture.png
    python sample.py --mode=i2t --prompt="q: how many objects are there? a:"   # a question about the picture
    python sample.py --mode=text --prompt="there are"

A KV cache keeps the prefix's keys and values, so each Euler step of an image runs only its N latent slots;
`--cache=False` recomputes the whole sequence every step (the reference the cache is tested against).
"""

import os
import sys

import numpy as np
import torch

import data
import flow
from model import KVCache
from rae import to_uint8

# -----------------------------------------------------------------------------
ckpt = 'out/ckpt.pt'
out_dir = ''              # '' = <checkpoint folder>/samples
mode = 'all'              # all | text | t2i | i2t | interleaved | rollout
prompt = ''
actions = ''              # rollout: ';'-separated, e.g. 'right x2, up; action: dx=+1, dy=0' ('' = a held-out walk's)
image = ''                # i2t: a PNG/JPEG file; '' = a held-out world image
n = 8                     # t2i: images per prompt
steps = 25                # Euler steps (PAPER.md §3)
cfg_scale = 3.0           # classifier-free guidance (PAPER.md §4)
temperature = 0.0         # 0 = greedy
top_k = 0                 # 0 = no top-k filter
max_new_tokens = 120
seed = 0
device = 'auto'
cache = True
# -----------------------------------------------------------------------------


class Doc:
    """One document being generated for B samples at once: the per-token arrays that model.hidden reads,
    and how many of them the KV cache has already absorbed (`seen`)."""

    def __init__(self, tok, B, d_latent, device):
        self.tok = tok
        self.tokens = torch.zeros(B, 0, dtype=torch.long, device=device)
        self.modality = torch.zeros_like(self.tokens)
        self.block = torch.zeros_like(self.tokens)
        self.z = torch.zeros(B, 0, d_latent, device=device)
        self.t = torch.zeros(B, 0, device=device)
        self.n_blocks = 0
        self.seen = 0

    def __len__(self):
        return self.tokens.shape[1]

    def add_text(self, ids):
        """ids: a list (the same for every sample) or a (B, k) tensor."""
        B, d = self.z.shape[0], self.z.shape[2]
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.tokens.device)
        ids = ids.view(1, -1).expand(B, -1) if ids.dim() == 1 else ids
        k = ids.shape[1]
        self._add(ids, torch.zeros_like(ids), torch.full_like(ids, -1), self.z.new_zeros(B, k, d), self.t.new_ones(B, k))

    def add_latents(self, z, t=1.0):
        B, N, _ = z.shape
        slots = torch.full((B, N), self.tok.img, dtype=torch.long, device=z.device)
        self._add(slots, torch.ones_like(slots), torch.full_like(slots, self.n_blocks), z, self.t.new_full((B, N), t))
        self.n_blocks += 1

    def _add(self, tokens, modality, block, z, t):
        self.tokens = torch.cat([self.tokens, tokens], 1)
        self.modality = torch.cat([self.modality, modality], 1)
        self.block = torch.cat([self.block, block], 1)
        self.z = torch.cat([self.z, z], 1)
        self.t = torch.cat([self.t, t], 1)

    def arrays(self, start=0):
        B, T = self.tokens.shape
        pos = torch.arange(start, T, device=self.tokens.device).expand(B, -1)
        doc = torch.zeros(B, T - start, dtype=torch.long, device=self.tokens.device)
        return (self.tokens[:, start:], self.modality[:, start:], self.block[:, start:], doc, pos,
                self.z[:, start:], self.t[:, start:])


def advance(model, doc, kv):
    """Hidden states of the positions the model has not seen yet; with a cache they are stored in it."""
    if kv is None:
        h = model.hidden(*doc.arrays())[0]
        out = h[:, doc.seen:]
    else:
        out = model.hidden(*doc.arrays(doc.seen), cache=kv)[0]
    doc.seen = len(doc)
    return out


def peek_block(model, doc, kv, z, t):
    """Hidden states of a tentative visual block (z at time t) after the document, leaving doc and cache as
    they were: one Euler step."""
    B, N, _ = z.shape
    saved = (doc.tokens, doc.modality, doc.block, doc.z, doc.t, doc.n_blocks)
    doc.add_latents(z, t)
    if kv is None:
        h = model.hidden(*doc.arrays())[0][:, -N:]
    else:
        kv.store = False
        h = model.hidden(*doc.arrays(doc.seen), cache=kv)[0]
        kv.store = True
    doc.tokens, doc.modality, doc.block, doc.z, doc.t, doc.n_blocks = saved
    return h


def next_token(model, h_last, temperature, top_k, generator):
    logits = model.lm_head(h_last).float()  # (B, vocab)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_image(model, tok, doc, kv, steps, cfg_scale, generator):
    """Append <BOI> to `doc` and generate that image's latents [B, N, d]. Classifier-free guidance runs
    against the unconditional document <BOS><BOI> (the caption dropped, as in training), with a cache of its
    own when `doc` has one."""
    B = len(doc.tokens)
    cfg = model.cfg
    doc.add_text([tok.boi])
    advance(model, doc, kv)
    uncond = start_doc(model, tok, [], B)
    uncond.add_text([tok.boi])
    kvs = (kv, KVCache(cfg.n_layer) if kv is not None else None)
    advance(model, uncond, kvs[1])
    noise = torch.randn(B, cfg.n_latent, cfg.d_latent, generator=generator, device=doc.z.device)

    def velocity(z, t, cond):
        d, kv = (doc, kvs[0]) if cond else (uncond, kvs[1])
        h = peek_block(model, d, kv, z, t)
        t_tok = torch.full(z.shape[:2], t, device=z.device)
        return flow.to_velocity(model.lat_out(h).float(), z, t_tok, cfg.flow_target)

    return flow.euler_sample(velocity, noise, steps, cfg.alpha, cfg_scale)


def start_doc(model, tok, segments, B):
    """A document opened with <BOS> and the given segments (text, or Visual with latents) for B samples."""
    device = next(model.parameters()).device
    doc = Doc(tok, B, model.cfg.d_latent, device)
    doc.add_text([tok.bos])
    for s in segments:
        if isinstance(s, str):
            doc.add_text(tok.encode(s))
        else:
            doc.add_text([tok.boi])
            doc.add_latents(s.latents.to(device).expand(B, -1, -1))
            doc.add_text([tok.eoi])
    return doc


@torch.no_grad()
def text_to_image(model, tok, caption, B=1, steps=25, cfg_scale=3.0, seed=0, use_cache=True):
    """B images for one caption: <BOS> caption <BOI> then the Euler sampler. Returns latents [B, N, d]."""
    model.eval()
    doc = start_doc(model, tok, [caption], B)
    generator = torch.Generator(device=doc.z.device).manual_seed(seed)
    return sample_image(model, tok, doc, KVCache(model.cfg.n_layer) if use_cache else None, steps, cfg_scale,
                        generator)


@torch.no_grad()
def generate(model, tok, segments, B=1, max_new_tokens=100, steps=25, cfg_scale=3.0, temperature=0.0, top_k=0,
             seed=0, use_cache=True):
    """Continue a document for B samples. Text is decoded token by token until <EOS>. When every sample emits
    <BOI> at the same step (always so for B = 1) an image is generated with CFG, fed back clean, <EOI> is
    appended and text resumes; a <BOI> that not all samples emit ends that sample's text.
    Returns (new token ids [B, L] with -1 after the end, list of generated latents [B, N, d])."""
    model.eval()
    cfg = model.cfg
    doc = start_doc(model, tok, segments, B)
    kv = KVCache(cfg.n_layer) if use_cache else None
    generator = torch.Generator(device=doc.z.device).manual_seed(seed)
    images, out = [], []
    done = torch.zeros(B, dtype=torch.bool, device=doc.z.device)
    h = advance(model, doc, kv)
    for _ in range(max_new_tokens):
        ids = next_token(model, h[:, -1], temperature, top_k, generator)
        if (ids == tok.boi).all():
            z = sample_image(model, tok, doc, kv, steps, cfg_scale, generator)
            images.append(z)
            doc.add_latents(z)  # fed back clean (t = 1) as context for what follows
            advance(model, doc, kv)
            doc.add_text([tok.eoi])
            out += [ids, torch.full_like(ids, tok.eoi)]
            h = advance(model, doc, kv)
            continue
        ids = torch.where(done, -1, ids)
        out.append(ids)
        done |= (ids == tok.eos) | (ids == tok.boi)
        if done.all():
            break
        doc.add_text(ids.clamp(min=0)[:, None])
        h = advance(model, doc, kv)
    ids = torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long)
    return ids, images


@torch.no_grad()
def rollout(model, tok, frames, actions, steps=25, seed=0, use_cache=True):
    """Action-conditioned prediction (PAPER.md §7), for B walks at once. frames: latents of the F context
    frames [B, F, N, d]; actions: F - 1 + H action texts, each a list of B strings (or one string for all)
    whose token counts agree across B (numeric actions always do). Frame k + 1 follows action k. Each of the
    H new frames is predicted from the last F frames and the actions between them, the layout of a training
    clip of F + 1 frames (a sliding window, as NWM conditions on its last 4 frames): <BOS> f a f a ... f a,
    then Euler steps without guidance (no action was ever dropped in training). Returns [B, H, N, d]."""
    model.eval()
    B, F = frames.shape[:2]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = []
    for act in actions:
        texts = [act] * B if isinstance(act, str) else act
        enc = [tok.encode(a) for a in texts]
        if len({len(e) for e in enc}) != 1:
            raise ValueError(f"action texts {texts} tokenize to different lengths; batch equal-length ones")
        ids.append(torch.tensor(enc, device=device))
    seq = list(frames.to(device).unbind(1))
    for h in range(len(actions) - (F - 1)):
        doc = Doc(tok, B, model.cfg.d_latent, device)
        doc.add_text([tok.bos])
        first = len(seq) - F      # index of the window's first frame
        for k in range(F):
            doc.add_text([tok.boi])
            doc.add_latents(seq[first + k])
            doc.add_text([tok.eoi])
            doc.add_text(ids[first + k])
        if len(doc) + model.cfg.n_latent + 1 > model.cfg.block_size:
            raise ValueError(f"a rollout window of {F} frames and their actions takes {len(doc)} tokens, too many "
                             f"for this model's context of {model.cfg.block_size} (train with block_size=512)")
        kv = KVCache(model.cfg.n_layer) if use_cache else None
        seq.append(sample_image(model, tok, doc, kv, steps, 1.0, generator))   # opens the block with <BOI>
    return torch.stack(seq[F:], 1)


# -----------------------------------------------------------------------------
# checkpoints and pictures


def load_checkpoint(path, device='cpu'):
    """(model, tokenizer, encoder, train config) from a train.py checkpoint, with one clear error if the file
    is missing or does not fit the model it describes."""
    import train
    from model import ModelConfig, Transfusion
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path} (train one first: python train.py)")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
        # keys added to train.py after the checkpoint was written take their defaults; checkpoints from
        # before the RAE encoders used pixels
        cfg, mcfg = {**train.knobs(vars(train)), 'encoder': 'pixel', **ck['config']}, ModelConfig(**ck['model_config'])
        tok, encoder, _, _ = train.build(cfg, fit=False)  # the checkpoint brings the encoder's statistics
        model = Transfusion(mcfg).to(device)
        model.load_state_dict(ck['model'])
        encoder.load_state_dict(ck['encoder'])
    except (KeyError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise SystemExit(f"error: {path} is not a compatible checkpoint ({type(e).__name__}: {str(e)[:200]})")
    return model.eval(), tok, encoder.to(device), cfg


def save_grid(path, images, cols=8, scale=4):
    """uint8 [B, H, W, 3] -> one PNG, images side by side (nearest-neighbour upscaled for viewing)."""
    import imageio.v3 as iio
    B, H, W, _ = images.shape
    cols = min(cols, B)
    rows = -(-B // cols)
    grid = np.zeros((rows * (H + 1) + 1, cols * (W + 1) + 1, 3), np.uint8) + 255
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = img
    iio.imwrite(path, grid.repeat(scale, 0).repeat(scale, 1))


def read_image(path, res):
    """A picture file -> float [1, 3, res, res]; a clear error for unreadable files or the wrong size."""
    import imageio.v3 as iio
    try:
        img = iio.imread(path)
    except Exception as e:  # imageio raises many types for a bad file
        raise SystemExit(f"error: cannot read image {path}: {e}")
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if img.shape[:2] != (res, res):
        raise SystemExit(f"error: image {path} is {img.shape[1]}x{img.shape[0]}; this model reads {res}x{res}")
    return data.image_tensor([img])


def write_rollout(model, tok, encoder, actions, path, steps, seed, context=4):
    """A held-out walk's first `context` frames, then the model's frames for `actions` (';'-separated text,
    numeric or words; '' = the walk's own next 4 actions), as a GIF: the model above, the true world below."""
    import video
    rng = np.random.default_rng([seed, 9])
    ids = video.map_ids('heldout')
    map_id = ids[int(rng.integers(len(ids)))]
    frames, walk, positions = video.sample_trajectory(rng, map_id, context + 4)
    own = [video.format_action(*a) for a in walk[context - 1:]]
    texts = [a.strip() for a in actions.split(';')] if actions else own
    try:
        moves = [video.parse_action(a) for a in texts]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    (x, y), truth = positions[context - 1], list(frames[:context])
    for dx, dy in moves:
        x, y = x + dx, y + dy
        try:
            truth.append(video.view(video.make_map(map_id), x, y, encoder.res))
        except ValueError:
            raise SystemExit(f"error: the actions {actions!r} walk off the map (to x={x}, y={y})")
    device = next(model.parameters()).device
    z = encoder.encode(data.image_tensor(list(frames[:context])).to(device))[None]
    try:
        pred = rollout(model, tok, z, [video.format_action(*a) for a in walk[:context - 1]] + texts, steps, seed)[0]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    top = np.concatenate([frames[:context], to_uint8(encoder.decode(pred))])
    video.write_gif(path, np.concatenate([top, np.stack(truth)], axis=1), fps=2, scale=4)


def main(argv):
    import train
    import world
    cfg = train.configure(train.knobs(globals()), argv)
    if cfg['mode'] not in ('all', 'text', 't2i', 'i2t', 'interleaved', 'rollout'):
        raise SystemExit(f"error: mode must be all, text, t2i, i2t, interleaved or rollout, got {cfg['mode']!r}")
    dev = cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    model, tok, encoder, tcfg = load_checkpoint(cfg['ckpt'], dev)
    out = cfg['out_dir'] or os.path.join(os.path.dirname(cfg['ckpt']) or '.', 'samples')
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng([cfg['seed'], 7])
    kw = dict(steps=cfg['steps'], cfg_scale=cfg['cfg_scale'], seed=cfg['seed'], use_cache=cfg['cache'])
    gen = dict(max_new_tokens=cfg['max_new_tokens'], temperature=cfg['temperature'], top_k=cfg['top_k'], **kw)
    longest = model.cfg.block_size - model.cfg.n_latent - 4
    if len(tok.encode(cfg['prompt'])) > longest:
        raise SystemExit(f"error: the prompt is {len(tok.encode(cfg['prompt']))} tokens; this model's context "
                         f"leaves room for {longest} before an image")

    def text_of(ids):
        return tok.decode([i for i in ids.tolist() if i >= 0])

    if cfg['mode'] in ('all', 'text'):
        prompt = cfg['prompt'] or 'there is'
        ids, _ = generate(model, tok, [prompt], **gen)
        print(f"[text] {prompt!r} -> {text_of(ids[0])!r}")
    if cfg['mode'] in ('all', 't2i'):
        prompts = [cfg['prompt']] if cfg['prompt'] else [world.caption(world.sample_scene(rng, 1), rng) for _ in range(4)]
        rows = []
        for i, p in enumerate(prompts):
            z = text_to_image(model, tok, p, B=cfg['n'], **kw)
            rows.append(to_uint8(encoder.decode(z)))
            print(f"[t2i] row {i}: {p!r}")
        path = os.path.join(out, 't2i.png')
        save_grid(path, np.concatenate(rows), cols=cfg['n'])
        print(f"[t2i] wrote {path}")
    if cfg['mode'] in ('all', 'i2t'):
        if cfg['image']:
            images, truth = read_image(cfg['image'], encoder.res), None
        else:
            scene = world.sample_scene(rng)
            images, truth = data.image_tensor([world.render(scene, encoder.res, rng=rng)]), scene
        z = encoder.encode(images.to(dev))[0]
        # after the picture, the prompt (a question, as qa documents write it) or nothing (a caption, or the
        # model's own question: it writes whichever of its training documents it finds likelier)
        asked = cfg['prompt'] if cfg['mode'] == 'i2t' else ''
        ids, _ = generate(model, tok, [data.Visual(None, False, z)] + ([asked] if asked else []), **gen)
        print(f"[i2t] {asked!r} -> {text_of(ids[0])!r}" + (f"  (truth: {truth})" if truth else ''))
    if cfg['mode'] in ('all', 'interleaved'):
        prompt = cfg['prompt'] or world.caption(world.sample_scene(rng, 1), rng)
        ids, images = generate(model, tok, [prompt], **gen)
        print(f"[interleaved] {prompt!r} -> {text_of(ids[0])!r} with {len(images)} image(s)")
        if images:
            path = os.path.join(out, 'interleaved.png')
            save_grid(path, to_uint8(encoder.decode(torch.cat(images))))
            print(f"[interleaved] wrote {path}")
    if cfg['mode'] == 'rollout' or (cfg['mode'] == 'all' and 'action' in data.parse_mixture(tcfg['mixture'])[0]):
        path = os.path.join(out, 'rollout.gif')
        write_rollout(model, tok, encoder, cfg['actions'], path, cfg['steps'], cfg['seed'])
        print(f"[rollout] wrote {path} (top: the model, bottom: the true world)")


if __name__ == '__main__':
    main(sys.argv[1:])
