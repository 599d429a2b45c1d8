"""
Frozen visual encoders and the RAE: images -> latents [N_tokens, d_latent] -> images.

A Representation Autoencoder (docs/paper.md §6) is a frozen representation encoder plus a ViT pixel decoder
trained to invert it. Every encoder sits behind one boundary, and ENCODERS below says how each is built:

    enc.encode(images)   images float [B, 3, H, W] in [0, 1]  ->  latents [B, N, d]  (normalised per channel)
    enc.decode(latents)  latents [B, N, d]                      ->  images [B, 3, res, res] (not clamped)
    enc.n_tokens, enc.d_latent, enc.res (the picture size it reads and writes)

    python rae.py                              # build the default vit RAE (or reuse it) and score it
    python rae.py --encoder=dinov2             # DINOv2 ViT-S/14 from Hugging Face (or --encoder_path=a/folder)
    python rae.py --report=True                # pixel, vit and dinov2 side by side -> docs/rae.json
    python rae.py --image_folder=my_pictures   # fit the encoder and train the decoder on your pictures

Building one (build_encoder): pretrain the encoder (vit only, rae_train.py), measure the latent normalisation
on training pictures, encode the training pool once into the latent cache (data.py), then train the decoder
on the cached latents (rae_train.py). The result is saved under cache_dir, keyed by its knobs, and reused.
"""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

import data
import documents
import folders
import pretrained
import rae_score
import shard_data
from configurator import configure, fail, remove_orphans, save_atomic
from pretrained import LatentNorm
from rae_train import load_or_none, pretrain_mae, train_decoder
from vit import ViT, patchify, unpatchify

# -----------------------------------------------------------------------------
# knobs: which encoder, and how its RAE is built (train.py, bench.py and `python rae.py` read them)
KNOBS = dict(
    encoder='vit',           # pixel | vit | dinov2 | siglip2: the frozen encoder (built once into cache_dir)
    encoder_path='',         # dinov2 / siglip2: '' = its Hugging Face id (downloaded once, verified), or a local folder
    cache_dir='cache',       # built RAEs and latent caches, shared by every run
    image_size=32,           # pictures are image_size x image_size
    patch_size=8,            # (32/8)^2 = 16 latent tokens per picture (4: 64, the finer grid; docs/speedrun.md)
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

# -----------------------------------------------------------------------------
# the encoders


class PixelEncoder(nn.Module):
    """The paper's pixel baseline: non-overlapping RGB patches (14x14x3 = 588-d at 224²), each colour channel
    standardised with statistics measured on training pictures. Per channel, not per dimension: the world's
    background is flat, so some patch dimensions barely vary and per-dimension scaling would blow up their
    noise. It decodes exactly: no decoder to train."""

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


class VitEncoder(LatentNorm):
    """The offline default: a ViT on patch_size patches pretrained on world pictures by masked autoencoding
    (MAE, He et al. 2022: hide 75% of the patches, predict their pixels from the rest; rae_train.py). Why MAE:
    it needs no augmentation design and no negative pairs, it trains in a couple of CPU minutes, and to fill in
    hidden patches it must learn what the world is made of (objects, their colours, shapes and extents). The
    latent is the last hidden state after a LayerNorm without affine (the RAE recipe), then standardised per
    channel with statistics measured on training pictures (fit)."""

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


# The encoders, name -> how each is built. make(c, grid): the frozen encoder for config c (grid = image_size /
# patch_size tokens a side; the pretrained towers read pictures resized to their patch size x grid);
# decoder: an RAE (a pixel decoder trained to invert it) or its own exact inverse; mae: pretrained here by
# masked autoencoding; feat_loss: the decoder's feature loss may backpropagate through it (cheap only for the
# small vit); path: the checkpoint encoder_path='' means; knobs: the knobs only it reads; weights: the knobs
# that decide its weights, which a checkpoint must match to resume.
ENCODERS = {
    'pixel': dict(make=lambda c, grid: PixelEncoder(c['image_size'], c['patch_size']),
                  decoder=False, mae=False, feat_loss=False, path='', knobs=(), weights=()),
    'vit': dict(make=lambda c, grid: VitEncoder(c['image_size'], c['patch_size'], d=c['vit_dim']),
                decoder=True, mae=True, feat_loss=True, path='', knobs=('vit_dim', 'mae_steps', 'feat_weight'),
                weights=('vit_dim', 'mae_steps', 'rae_images', 'rae_batch')),
    'dinov2': dict(make=lambda c, grid: pretrained.load_dinov2(c['encoder_path'], res=14 * grid),
                   decoder=True, mae=False, feat_loss=False, path='facebook/dinov2-small',
                   knobs=('encoder_path',), weights=('encoder_path',)),
    'siglip2': dict(make=lambda c, grid: pretrained.load_siglip2(c['encoder_path'], grid=grid),
                    decoder=True, mae=False, feat_loss=False, path='google/siglip2-base-patch16-224',
                    knobs=('encoder_path',), weights=('encoder_path',)),
}

# -----------------------------------------------------------------------------
# building an encoder from a config (or reusing it): shared by train.py, sample.py, eval.py and `python rae.py`

report = False            # python rae.py: score pixel, vit and dinov2 side by side -> docs/rae.json
RECIPE = 2                # bump when the building code changes what it builds: old cached RAEs are then rebuilt


def check_knobs(c):
    """The encoder knobs' values, before anything is built: one sentence for the first bad one."""
    if c['encoder'] not in ENCODERS:
        fail(f"unknown encoder {c['encoder']!r}: pick {', '.join(ENCODERS)}")
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
    return ['encoder', 'image_size', 'patch_size', 'image_folder', 'image_shards', *ENCODERS[c['encoder']]['weights']]


def n_tokens(c):
    """Latent tokens per picture, for any encoder: one per patch of the (image_size / patch_size)^2 grid."""
    return (c['image_size'] // c['patch_size']) ** 2


def rae_key(c):
    """The name of a built RAE in cache_dir: a hash of every knob that changes what gets built (the knobs of
    other encoders left out), and of the image_folder it is built on, if any (by path: a folder that changes
    keeps its RAE, and gets new latents)."""
    others = {k for spec in ENCODERS.values() for k in spec['knobs']} - set(ENCODERS[c['encoder']]['knobs'])
    unused = {'cache_dir'} | others
    where = ({'image_folder': os.path.abspath(c['image_folder'])} if c['image_folder'] else
             {'image_shards': c['image_shards']} if c.get('image_shards') else {})
    key = json.dumps({'recipe': RECIPE, **where, **{k: c[k] for k in KNOBS if k not in unused}}, sort_keys=True)
    return f"rae-{c['encoder']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def build_encoder(cfg, fit=True):
    """The encoder a config dict names (keys missing from cfg take KNOBS' defaults), ready to use.
    fit=False: only the skeleton (a checkpoint will bring the weights). Otherwise the pixel encoder measures
    its normalisation, and an RAE is loaded from cache_dir, or built there: every stage checkpoints and
    resumes, so a killed build continues where it stopped; a cached file that does not load is rebuilt."""
    c = {**{k: cfg.get(k, v) for k, v in KNOBS.items()}, 'image_folder': cfg.get('image_folder', ''),
         'image_shards': cfg.get('image_shards', '')}
    check_knobs(c)
    spec = ENCODERS[c['encoder']]
    c['encoder_path'] = c['encoder_path'] or spec['path']
    res, grid = c['image_size'], c['image_size'] // c['patch_size']

    def own_pictures():
        """An image_folder's training pictures (memory-mapped), or image_shards' first training pictures (read
        now, enough for the fit and the RAE's training), else None (the world's): what the encoder is fitted on."""
        if not fit or not (c['image_folder'] or c['image_shards']):
            return None
        if c['image_folder']:
            return folders.open_images(c['image_folder'], res, c['cache_dir']).pictures('train')[0]
        return shard_data.first_pictures(cfg, max(32, 2048 * 32 * 32 // (res * res), c['rae_images']), res)

    with torch.random.fork_rng():    # building must not move the caller's RNG (train.py seeds the model first)
        torch.manual_seed(0)
        enc = spec['make'](c, grid)
        rae = RAE(enc, res, d=c['decoder_dim']) if spec['decoder'] else None
    if rae is None:
        if fit:  # per-channel statistics: 2M pixels are plenty (2,048 pictures at 32², 41 at 224²)
            own = own_pictures()
            n = max(32, (2048 * 32 * 32) // (res * res))
            enc.fit(data.image_tensor(own[:n] if own is not None else documents.world_images('train', n, res)))
        return enc
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
    own = own_pictures()
    images = own[:c['rae_images']] if own is not None else documents.world_images('rae', c['rae_images'], res)
    stage = lambda stage_name: folder / f"{name}.{stage_name}.pt"
    with torch.random.fork_rng():
        torch.manual_seed(1337)      # the same settings build the same RAE, whoever asks (the default seed)
        if spec['mae']:
            enc.requires_grad_(True)
            pretrain_mae(enc, images, c['mae_steps'], c['rae_batch'], stage('mae'))
        with torch.no_grad():
            enc.fit(data.image_tensor(images[:4096]))
        latents = data.latent_cache(rae, 'rae', len(images), folder, pictures=images if own is not None else None,
                                    tag=None if own is None else f"{name},{len(images)}")
        train_decoder(rae, latents, images, c['decoder_steps'], c['rae_batch'], stage('decoder'), tau=c['tau'],
                      feat_weight=c['feat_weight'] if spec['feat_loss'] else 0.0,
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


def main(argv):
    usage = """python rae.py [config.py] [--key=value ...]: build (or reuse) an RAE and score it (rae_score.py);
--report=True scores pixel, vit and dinov2 side by side into docs/rae.json."""
    here = os.path.abspath(__file__)
    cfg = configure({**KNOBS, 'report': report, 'image_folder': ''}, argv, usage,
                    [('encoder (rae.py)', list(KNOBS), here), ('this script', ['report'], here),
                     ('data', ['image_folder'], data.__file__)])
    check_knobs(cfg)
    torch.set_num_threads(os.cpu_count() or 1)
    if cfg['image_folder']:  # an RAE fitted and trained on your pictures (train.py builds the same one)
        print(json.dumps(rae_score.score_folder(build_encoder(cfg), cfg['image_folder'], cfg['cache_dir']), indent=1))
        return
    if not cfg['report']:
        print(json.dumps(rae_score.score(build_encoder(cfg)), indent=1))
        return
    # DINOv2 decodes 4,096 pictures: backpropagating a feature loss through it is too slow on a CPU anyway
    over = {'pixel': {}, 'vit': {}, 'dinov2': {'rae_images': 4096}}
    rows = [rae_score.score(build_encoder({**cfg, 'encoder': name, **o})) for name, o in over.items()]
    print(f"{'encoder':8} {'N x d':>8} {'PSNR':>6} {'parsed':>7} {'probe':>6} {'@cell':>6} {'enc/s':>7} {'dec/s':>7}")
    for r in rows:
        cell = '-' if r['probe_shape_at_place'] is None else f"{r['probe_shape_at_place']:.3f}"
        print(f"{r['encoder']:8} {r['n_tokens']:>3}x{r['d_latent']:<4} {r['psnr']:6.1f} {r['parse_accuracy']:7.3f} "
              f"{r['probe_largest_shape']:6.3f} {cell:>6} {r['encode_per_s']:7.0f} {r['decode_per_s']:7.0f}")
    Path('docs').mkdir(exist_ok=True)
    Path('docs/rae.json').write_text(json.dumps(rows, indent=1))
    print("wrote docs/rae.json")


if __name__ == '__main__':
    main(sys.argv[1:])
