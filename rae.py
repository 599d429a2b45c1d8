"""
Frozen visual encoders and the RAE: images -> latents [N_tokens, d_latent] -> images.

A Representation Autoencoder (docs/paper.md §6) is a frozen representation encoder plus a ViT pixel decoder trained
to invert it. Three encoders live behind one boundary:
    pixel   non-overlapping RGB patches (the paper's pixel baseline; decodes exactly, no decoder to train)
    vit     a small ViT pretrained here on world pictures by masked autoencoding (MAE): the offline default
    dinov2, siglip2   pretrained vision towers from Hugging Face checkpoints (pretrained.py)

    enc.encode(images)   images float [B, 3, H, W] in [0, 1]  ->  latents [B, N, d]  (normalised per channel)
    enc.decode(latents)  latents [B, N, d]                      ->  images [B, 3, res, res] (not clamped)
    enc.n_tokens, enc.d_latent, enc.res (the picture size it reads and writes)

    python rae.py                              # build the default vit RAE (or reuse it) and score it
    python rae.py --encoder=dinov2 --encoder_path=../shared/weights/dinov2-vits14
    python rae.py --report=True                # pixel, vit and dinov2 side by side -> docs/rae.json
    python rae.py --image_folder=my_pictures   # fit the encoder and train the decoder on your pictures

Building one: pretrain the encoder (vit only), measure the latent normalisation on training pictures, encode
the training pool once into the latent cache (data.py), then train the decoder on the cached latents with
L1 + a feature loss (+ optional adversarial loss) and noise augmentation. Each stage shows progress,
checkpoints every few hundred steps and resumes; the result is saved under cache_dir and reused.
"""

import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import folders
import pretrained
import world
from configurator import configure, fail, remove_orphans, save_atomic, seed_of
from pretrained import LatentNorm

# -----------------------------------------------------------------------------
# knobs: which encoder, and how its RAE is built (train.py, bench.py and `python rae.py` read them)
KNOBS = dict(
    encoder='vit',           # pixel | vit | dinov2 | siglip2: the frozen encoder (built once into cache_dir)
    encoder_path='',         # dinov2 / siglip2: a local folder (config.json + model.safetensors) or a HF repo id
    cache_dir='cache',       # built RAEs and latent caches, shared by every run
    image_size=32,           # pictures are image_size x image_size
    patch_size=8,            # (32/8)^2 = 16 latent tokens per picture (4: 64, the finer grid; README speedrun)
    vit_dim=64,              # vit: the encoder's width = the latent dims per token
    decoder_dim=192,         # the pixel decoder's width (a 3-layer ViT); 8x8 patches need the wider one
    rae_images=16384,        # pictures the MAE and the decoder train on (data.py's rae split)
    rae_batch=64,            # pictures per MAE / decoder step
    mae_steps=1000,          # vit encoder pretraining steps
    decoder_steps=800,       # RAE decoder training steps
    tau=0.8,                 # decoder noise augmentation sigma = tau * U(0, 1) (docs/paper.md §6)
    feat_weight=0.1,         # feature loss weight (vit only: backpropagating through a big tower is slow)
    gan_weight=0.0,          # adversarial loss weight (0 = off)
    gan_start=600,           # decoder step the adversarial loss starts at
)
ENCODERS = ('pixel', 'vit', 'dinov2', 'siglip2')

# -----------------------------------------------------------------------------
# pixels: the paper's pixel baseline (non-overlapping RGB patches, 14x14x3 = 588-d at 224²)


def patchify(images, patch):
    """[B, 3, H, W] -> [B, (H/p)*(W/p), p*p*3], patches row-major, each patch (p, p, rgb) flattened."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(x, patch, channels=3):
    """Inverse of patchify for a square grid."""
    B, N, _ = x.shape
    g = int(round(N ** 0.5))
    x = x.reshape(B, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, g * patch, g * patch)


class PixelEncoder(nn.Module):
    """Patchify, then standardise each colour channel with statistics measured on training images.
    Per-channel (not per-dimension) statistics: the world's background is flat, so some patch dimensions
    barely vary and per-dimension scaling would blow their noise up."""

    name = 'pixel'

    def __init__(self, res=32, patch=4):
        super().__init__()
        if res % patch:
            raise ValueError(f"image size {res} is not a multiple of the patch size {patch}")
        self.res, self.patch = res, patch
        self.n_tokens = (res // patch) ** 2
        self.d_latent = 3 * patch * patch
        self.register_buffer('mean', torch.zeros(3))
        self.register_buffer('std', torch.ones(3))

    @torch.no_grad()
    def fit(self, images):
        """Measure the normalisation on a batch of training images [B, 3, H, W] in [0, 1]."""
        self.mean.copy_(images.mean(dim=(0, 2, 3)))
        self.std.copy_(images.std(dim=(0, 2, 3)).clamp(min=1e-3))
        return self

    def _stats(self):
        # per latent dim: the channel of that dim (patches are flattened as (p, p, rgb))
        return self.mean.repeat(self.patch * self.patch), self.std.repeat(self.patch * self.patch)

    @torch.no_grad()
    def encode(self, images):
        if images.shape[-2:] != (self.res, self.res):
            raise ValueError(f"pixel encoder expects {self.res}x{self.res} images, got {tuple(images.shape[-2:])}")
        mean, std = self._stats()
        return (patchify(images.float(), self.patch) - mean) / std

    @torch.no_grad()
    def decode(self, latents):
        mean, std = self._stats()
        return unpatchify(latents.float() * std + mean, self.patch)


# -----------------------------------------------------------------------------
# a small ViT: the vit encoder, its MAE pretraining head and the pixel decoder are all this one module


class Block(nn.Module):
    """Pre-LN transformer block with full (bidirectional) attention: a picture is seen whole."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Linear in, learned position embeddings, blocks, final LayerNorm, optional linear out. `pos` [B, n] says
    which positions the n given tokens sit at (MAE feeds the encoder only the visible ones)."""

    def __init__(self, d_in, d, n_layer, n_head, n_pos, d_out=0, affine=True):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.pos = nn.Parameter(torch.randn(n_pos, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.out = nn.Linear(d, d_out) if d_out else nn.Identity()

    def forward(self, x, pos=None):
        h = self.inp(x) + (self.pos if pos is None else self.pos[pos])
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


class VitEncoder(LatentNorm):
    """The offline default encoder: a ViT on 8x8 patches (patch_size) pretrained on world pictures by masked
    autoencoding (MAE, He et al. 2022: hide 75% of the patches, predict their pixels from the rest). Why MAE:
    it needs no augmentation design and no negative pairs, it trains in a couple of CPU minutes, and to fill in hidden
    patches it must learn what the world is made of (objects, their colours, shapes and extents). Its
    latents keep the pixel detail a decoder needs, and a linear probe shows they are semantic (README).
    The latent is the last hidden state after a LayerNorm without affine (the RAE recipe), then standardised
    per channel with statistics measured on training pictures (fit)."""

    name = 'vit'

    def __init__(self, res=32, patch=4, d=64, n_layer=6, n_head=4):
        super().__init__(d)
        if res % patch:
            raise ValueError(f"image size {res} is not a multiple of the patch size {patch}")
        self.res, self.patch = res, patch
        self.n_tokens, self.d_latent = (res // patch) ** 2, d
        self.vit = ViT(3 * patch * patch, d, n_layer, n_head, self.n_tokens, affine=False)

    def patches(self, images):
        if images.shape[-2:] != (self.res, self.res):
            raise ValueError(f"vit encoder expects {self.res}x{self.res} images, got {tuple(images.shape[-2:])}")
        return patchify(images.float() * 2 - 1, self.patch)

    def raw_latents(self, images, keep=None):
        """[B, 3, res, res] -> [B, N, d]; with keep [B, k], only those patches are seen (and returned)."""
        x = self.patches(images)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.vit(x, keep)

class RAE(nn.Module):
    """A frozen encoder plus the ViT decoder trained to invert it: latents [B, N, d] -> pictures
    [B, 3, res, res], each latent token decoding to one res/sqrt(N) square patch."""

    def __init__(self, encoder, res=32, d=96, n_layer=3, n_head=4):
        super().__init__()
        g = int(round(encoder.n_tokens ** 0.5))
        if g * g != encoder.n_tokens or res % g:
            raise ValueError(f"{encoder.n_tokens} latent tokens do not tile a {res}x{res} picture")
        self.encoder = encoder.eval().requires_grad_(False)
        self.name, self.n_tokens, self.d_latent, self.res, self.patch = \
            encoder.name, encoder.n_tokens, encoder.d_latent, res, res // g
        self.decoder = ViT(self.d_latent, d, n_layer, n_head, self.n_tokens, d_out=3 * self.patch ** 2)

    def encode(self, images):
        return self.encoder.encode(images)

    def decode(self, latents):
        return unpatchify(self.decoder(latents.float()), self.patch) + 0.5


class PatchDiscriminator(nn.Module):
    """A small convolutional critic scoring overlapping patches, for the optional adversarial loss."""

    def __init__(self, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, images):
        return self.net(images * 2 - 1)


# -----------------------------------------------------------------------------
# training stages: MAE pretraining of the vit encoder, then the decoder


def run_stage(name, path, modules, opts, steps, lr, step_fn, seed, save_every=200):
    """The loop every stage shares: warmup + cosine (to 10%) on every optimizer, per-step randomness from
    (seed, step) only, a checkpoint of modules + optimizers every save_every steps (temp file + rename), and
    resume from it. A finished stage leaves its checkpoint at step == steps, so a rerun skips it."""
    start = 0
    ck = load_or_none(path, f'{name} checkpoint') if path.exists() else None
    if ck is not None:
        for m, sd in zip(modules + opts, ck['state']):
            m.load_state_dict(sd)
        start = ck['step']
        print(f"{name}: {'done, reusing' if start >= steps else f'resuming from step {start} of'} {path}")
    save = lambda step: save_atomic({'step': step, 'state': [m.state_dict() for m in modules + opts]}, path)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, disable=start >= steps)
    for step in bar:
        scale = min(1.0, (step + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for opt in opts:
            for group in opt.param_groups:
                group['lr'] = lr * scale
        logs = step_fn(step, torch.Generator().manual_seed(seed_of(seed, step)))
        if step % 10 == 0:
            bar.set_postfix(logs)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save(step + 1)


def adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)


def pretrain_mae(enc, images, steps, batch_size, path, seed=0, lr=2e-3, mask_ratio=0.75):
    """Masked autoencoding on uint8 pictures [n, H, W, 3]: the encoder sees a random 25% of the patches, a
    2-layer head (thrown away afterwards) predicts the pixels of all of them. Unlike MAE, the loss covers the
    visible patches too: it makes each latent keep its own patch, which an RAE decoder must read back
    (measured: hidden-only loss, 15% of held-out reconstructions parse; all patches, 100%)."""
    N, d = enc.n_tokens, enc.d_latent
    head = nn.ModuleDict({'vit': ViT(d, 64, 2, 4, N, d_out=3 * enc.patch ** 2)})
    head.mask = nn.Parameter(torch.zeros(d))
    opt = adamw(list(enc.parameters()) + list(head.parameters()), lr)
    n_keep = N - int(N * mask_ratio)

    def step_fn(step, gen):
        x = data.image_tensor(images[torch.randint(len(images), (batch_size,), generator=gen).numpy()])
        target = enc.patches(x)
        keep = torch.rand(batch_size, N, generator=gen).argsort(1)[:, :n_keep]
        h = enc.raw_latents(x, keep)
        full = head.mask.expand(batch_size, N, d).scatter(1, keep[..., None].expand(-1, -1, d), h)
        loss = F.mse_loss(head.vit(full), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {'mse': f'{loss.item():.4f}'}

    enc.train()
    run_stage('MAE pretraining (vit encoder)', path, [enc, head], [opt], steps, lr, step_fn, seed)
    return enc.eval().requires_grad_(False)


def train_decoder(rae, latents, images, steps, batch_size, path, seed=0, lr=3e-3, tau=0.8, feat_weight=0.1,
                  gan_weight=0.0, gan_start=0):
    """Train rae.decoder on cached latents [n, N, d] of the uint8 pictures [n, H, W, 3].
    Loss: L1 on pixels + feat_weight * MSE between the re-encoded reconstruction and the latent (a feature
    loss in the encoder's own space, our LPIPS stand-in; skipped with feat_weight=0, e.g. for big encoders
    on a CPU) + an optional hinge adversarial loss whose weight adapts to ||grad rec|| / ||grad adv|| at the
    decoder's last layer (as in RAE/VQGAN, capped at 1e4), from step gan_start.
    Noise augmentation (docs/paper.md §6: RAE's code, sigma = tau * U(0, 1) per picture): the decoder also learns
    to decode the slightly-off latents a diffusion model produces."""
    dec = rae.decoder
    n_feat = max(1, batch_size // 4)   # the feature loss backpropagates through the encoder: a quarter batch
    modules, opts = [dec], [adamw(dec.parameters(), lr)]
    if gan_weight:
        disc = PatchDiscriminator()
        modules.append(disc)
        opts.append(adamw(disc.parameters(), lr))

    def step_fn(step, gen):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = data.image_tensor(images[idx.numpy()])
        z = torch.from_numpy(np.asarray(latents[idx.numpy()], dtype=np.float32))
        sigma = tau * torch.rand(batch_size, 1, 1, generator=gen)
        x_hat = rae.decode(z + sigma * torch.randn(z.shape, generator=gen))
        l1 = F.l1_loss(x_hat, x)
        loss = l1 + feat_weight * F.mse_loss(rae.encode(x_hat[:n_feat]), z[:n_feat]) if feat_weight else l1
        logs = {'l1': f'{l1.item():.4f}'}
        if gan_weight and step >= gan_start:
            adv = -disc(x_hat).mean()
            last = dec.out.weight
            g_rec = torch.autograd.grad(loss, last, retain_graph=True)[0].norm()
            g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0].norm()
            loss = loss + gan_weight * (g_rec / (g_adv + 1e-4)).clamp(max=1e4).detach() * adv
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()
        if gan_weight and step >= gan_start:
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(x_hat.detach())).mean()
            opts[1].zero_grad(set_to_none=True)
            d_loss.backward()
            opts[1].step()
            logs['d'] = f'{d_loss.item():.3f}'
        return logs

    dec.train()
    run_stage(f'decoder training ({rae.name})', path, modules, opts, steps, lr, step_fn, seed)
    dec.eval()
    return rae


# -----------------------------------------------------------------------------
# building an encoder from a config (or reusing it): shared by train.py, sample.py, eval.py and `python rae.py`

report = False            # python rae.py: score pixel, vit (and dinov2 from ../shared) side by side -> docs/rae.json
DINOV2_LOCAL = Path(__file__).resolve().parent.parent / 'shared' / 'weights' / 'dinov2-vits14'
RECIPE = 2                # bump when the building code changes what it builds: old cached RAEs are then rebuilt


def check_knobs(c):
    """The encoder knobs' values, before anything is built: one sentence for the first bad one."""
    if c['encoder'] not in ENCODERS:
        fail(f"unknown encoder {c['encoder']!r}: pick {', '.join(ENCODERS)}")
    if c['encoder'] in ('dinov2', 'siglip2') and not c['encoder_path']:
        fail(f"encoder={c['encoder']} needs encoder_path: a local folder or a Hugging Face repo id "
             f"(e.g. facebook/dinov2-small, google/siglip2-base-patch16-224)")
    for k in ('image_size', 'patch_size', 'rae_images', 'rae_batch', 'decoder_steps'):
        if c[k] < 1:
            fail(f"{k} must be at least 1, got {c[k]}")
    if min(c['vit_dim'], c['decoder_dim']) < 4 or c['vit_dim'] % 4 or c['decoder_dim'] % 4:
        fail(f"vit_dim and decoder_dim must be positive multiples of 4 (their 4 heads), got {c['vit_dim']}, "
             f"{c['decoder_dim']}")
    if c['image_size'] % c['patch_size']:
        fail(f"image_size {c['image_size']} is not a multiple of patch_size {c['patch_size']}")
    if c['mae_steps'] < 0 or c['tau'] < 0 or c['feat_weight'] < 0 or c['gan_weight'] < 0:
        fail("mae_steps, tau, feat_weight and gan_weight must not be negative")


def identity_knobs(c):
    """The knobs that decide the encoder's weights, hence the latent space a model learns in (the decoder's
    knobs are not among them: a new decoder reads the same latents)."""
    vit = ['vit_dim', 'mae_steps', 'rae_images', 'rae_batch']
    extra = {'pixel': [], 'vit': vit}.get(c['encoder'], ['encoder_path'])
    return ['encoder', 'image_size', 'patch_size', 'image_folder', *extra]


def n_tokens(c):
    """Latent tokens per picture, for any encoder: one per patch of the (image_size / patch_size)^2 grid."""
    return (c['image_size'] // c['patch_size']) ** 2


def load_or_none(path, what):
    """torch.load a cache file; None (with a warning naming it, the file moved aside) if it does not load."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        aside = path.with_name(path.name + '.corrupt')
        os.replace(path, aside)
        print(f"warning: {what} {path} does not load ({type(e).__name__}): moved to {aside.name}, rebuilding it",
              file=sys.stderr)
        return None


def rae_key(c):
    """The name of a built RAE in cache_dir: a hash of every knob that changes what gets built, and of the
    image_folder it is built on, if any (by path: a folder that changes keeps its RAE, and gets new latents)."""
    unused = {'cache_dir'} | ({'encoder_path'} if c['encoder'] == 'vit' else {'mae_steps', 'feat_weight', 'vit_dim'})
    where = {'image_folder': os.path.abspath(c['image_folder'])} if c['image_folder'] else {}
    key = json.dumps({'recipe': RECIPE, **where, **{k: c[k] for k in KNOBS if k not in unused}}, sort_keys=True)
    return f"rae-{c['encoder']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def build_encoder(cfg, fit=True):
    """The encoder a config dict names (keys missing from cfg take KNOBS' defaults), ready to use.
    fit=False: only the skeleton (a checkpoint will bring the weights). Otherwise the pixel encoder measures
    its normalisation, and an RAE is loaded from cache_dir, or built there: every stage checkpoints and
    resumes, so a killed build continues where it stopped; a cached file that does not load is rebuilt."""
    c = {**{k: cfg.get(k, v) for k, v in KNOBS.items()}, 'image_folder': cfg.get('image_folder', '')}
    check_knobs(c)
    res, grid = c['image_size'], c['image_size'] // c['patch_size']
    # an image_folder's training pictures (memory-mapped), else the world's: what the encoder is fitted on
    own = folders.open_images(c['image_folder'], res, c['cache_dir']).pictures('train')[0] if c['image_folder'] \
        and fit else None
    if c['encoder'] == 'pixel':
        enc = PixelEncoder(res, c['patch_size'])
        if fit:
            enc.fit(data.image_tensor(own[:2048] if own is not None else data.world_images('train', 2048, res)))
        return enc
    with torch.random.fork_rng():    # building must not move the caller's RNG (train.py seeds the model first)
        torch.manual_seed(0)
        if c['encoder'] == 'vit':
            enc = VitEncoder(res, c['patch_size'], d=c['vit_dim'])
        else:
            enc = (pretrained.load_dinov2(c['encoder_path'], res=14 * grid) if c['encoder'] == 'dinov2'
                   else pretrained.load_siglip2(c['encoder_path'], grid=grid))
        rae = RAE(enc, res, d=c['decoder_dim'])
    if not fit:
        return rae
    folder, name = Path(c['cache_dir']), rae_key(c)
    path = folder / f"{name}.pt"
    state = load_or_none(path, 'cached RAE') if path.exists() else None
    if state is not None:
        rae.load_state_dict(state)
        print(f"reusing the {c['encoder']} RAE {path}")
        return rae
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder, re.escape(name))
    print(f"building the {c['encoder']} RAE (saved to {path} and reused afterwards)")
    images = own[:c['rae_images']] if own is not None else data.world_images('rae', c['rae_images'], res)
    stage = lambda stage_name: folder / f"{name}.{stage_name}.pt"
    with torch.random.fork_rng():
        torch.manual_seed(1337)      # the same settings build the same RAE, whoever asks (the default seed)
        if c['encoder'] == 'vit':
            enc.requires_grad_(True)
            pretrain_mae(enc, images, c['mae_steps'], c['rae_batch'], stage('mae'))
        with torch.no_grad():
            enc.fit(data.image_tensor(images[:4096]))
        latents = data.latent_cache(rae, 'rae', len(images), folder, pictures=images if own is not None else None,
                                    tag=None if own is None else f"{name},{len(images)}")
        train_decoder(rae, latents, images, c['decoder_steps'], c['rae_batch'], stage('decoder'), tau=c['tau'],
                      feat_weight=c['feat_weight'] if c['encoder'] == 'vit' else 0.0,
                      gan_weight=c['gan_weight'], gan_start=c['gan_start'])
    save_atomic(rae.state_dict(), path)
    for stage_name in ('mae', 'decoder'):
        stage(stage_name).unlink(missing_ok=True)
    print(f"saved the {c['encoder']} RAE to {path}")
    return rae


def check_width(d_model, enc):
    """The RAE rule (docs/paper.md §6): a transformer narrower than the latent cannot even fit one picture."""
    if d_model < enc.d_latent:
        print(f"warning: d_model={d_model} is below the {enc.name} latent dimension {enc.d_latent}: the flow loss "
              f"is bounded below by (d-w)/d = {(enc.d_latent - d_model) / enc.d_latent:.2f} (docs/paper.md §6)",
              file=sys.stderr)


# -----------------------------------------------------------------------------
# scoring: reconstruction PSNR and parse accuracy, a linear probe, throughput


def to_uint8(images):
    """float [B, 3, H, W] in ~[0, 1] -> uint8 [B, H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def largest_shape(scene):
    """The probe's label: the shape of the largest object (ties: the first in reading order)."""
    return world.SHAPES.index(max(scene, key=lambda o: (o.size == 'large', -o.place)).shape)


@torch.no_grad()
def mean_latents(enc, images, batch_size=256):
    return torch.cat([enc.encode(data.image_tensor(images[i:i + batch_size]))
                      .mean(1) for i in range(0, len(images), batch_size)])


def linear_probe(train_x, train_y, test_x, test_y, n_class, steps=300):
    """Multinomial logistic regression (L-BFGS, light L2) on standardised features; returns test accuracy."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(train_x.shape[1], n_class, requires_grad=True)
    b = torch.zeros(n_class, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return ((test_x @ w + b).argmax(1) == test_y).float().mean().item()


def psnr(recon, truth):
    return (10 * torch.log10(1 / (recon - truth).square().mean((1, 2, 3)).clamp(min=1e-10))).mean().item()


@torch.no_grad()
def score_folder(enc, image_folder, cache_dir):
    """Reconstruction PSNR of an image_folder's held-out pictures (the scene parser and probe are world-only)."""
    images = folders.open_images(image_folder, enc.res, cache_dir).pictures('val')[0]
    x = data.image_tensor(images[:1024])
    return {'encoder': enc.name, 'image_folder': image_folder, 'n_val': len(x), 'n_tokens': enc.n_tokens,
            'd_latent': enc.d_latent, 'psnr': psnr(enc.decode(enc.encode(x)).clamp(0, 1), x)}


@torch.no_grad()
def score(enc, n_val=1024, n_probe=4096):
    """Reconstruction of held-out pictures (PSNR, fraction parsing to the true scene), a linear probe of the
    mean latent on the largest object's shape, and encode/decode throughput (pictures/s)."""
    images, scenes = data.world_images('val', n_val, enc.res), data.world_scenes('val', n_val)
    recon, t_enc, t_dec = [], 0.0, 0.0
    for i in tqdm(range(0, n_val, 128), desc=f'scoring {enc.name}'):
        x = data.image_tensor(images[i:i + 128])
        t0 = time.perf_counter()
        z = enc.encode(x)
        t1 = time.perf_counter()
        recon.append(enc.decode(z).clamp(0, 1))
        t_enc, t_dec = t_enc + t1 - t0, t_dec + time.perf_counter() - t1
    recon = torch.cat(recon)
    truth = data.image_tensor(images)
    parsed = sum(world.parse(r) == tuple(sorted(s)) for r, s in zip(to_uint8(recon), scenes)) / n_val
    train_images, train_scenes = data.world_images('train', n_probe, enc.res), data.world_scenes('train', n_probe)
    label = lambda ss: torch.tensor([largest_shape(s) for s in ss])
    with torch.enable_grad():
        probe = linear_probe(mean_latents(enc, train_images), label(train_scenes), mean_latents(enc, images),
                             label(scenes), len(world.SHAPES))
    return {'encoder': enc.name, 'n_tokens': enc.n_tokens, 'd_latent': enc.d_latent, 'psnr': psnr(recon, truth),
            'parse_accuracy': parsed, 'probe_largest_shape': probe, 'probe_chance': 1 / len(world.SHAPES),
            'encode_per_s': n_val / t_enc, 'decode_per_s': n_val / t_dec}


def main(argv):
    usage = """python rae.py [config.py] [--key=value ...]: build (or reuse) an RAE and score it;
--report=True scores pixel, vit and dinov2 side by side into docs/rae.json."""
    here = os.path.abspath(__file__)
    cfg = configure({**KNOBS, 'report': report, 'image_folder': ''}, argv, usage,
                    [('encoder (rae.py)', list(KNOBS), here), ('this script', ['report'], here),
                     ('data', ['image_folder'], data.__file__)])
    check_knobs(cfg)
    torch.set_num_threads(os.cpu_count() or 1)
    if cfg['image_folder']:  # an RAE fitted and trained on your pictures (train.py builds the same one)
        print(json.dumps(score_folder(build_encoder(cfg), cfg['image_folder'], cfg['cache_dir']), indent=1))
        return
    if not cfg['report']:
        res = score(build_encoder(cfg))
        print(json.dumps(res, indent=1))
        return
    names = ['pixel', 'vit'] + (['dinov2'] if DINOV2_LOCAL.is_dir() else [])
    rows = []
    for name in names:
        over = {'encoder': name, 'rae_images': 4096, 'encoder_path': str(DINOV2_LOCAL)} if name == 'dinov2' \
            else {'encoder': name}
        rows.append(score(build_encoder({**cfg, **over})))
    print(f"{'encoder':8} {'N x d':>8} {'PSNR':>6} {'parsed':>7} {'probe':>6} {'enc/s':>7} {'dec/s':>7}")
    for r in rows:
        print(f"{r['encoder']:8} {r['n_tokens']:>3}x{r['d_latent']:<4} {r['psnr']:6.1f} {r['parse_accuracy']:7.3f} "
              f"{r['probe_largest_shape']:6.3f} {r['encode_per_s']:7.0f} {r['decode_per_s']:7.0f}")
    Path('docs').mkdir(exist_ok=True)
    Path('docs/rae.json').write_text(json.dumps(rows, indent=1))
    print("wrote docs/rae.json")


if __name__ == '__main__':
    main(sys.argv[1:])
