"""
How good an encoder and its decoder are (`python rae.py` prints these; `--report=True` for every encoder):

    score(enc)        held-out world pictures: reconstruction PSNR, the share whose reconstruction the scene
                      parser reads as the true scene, a linear probe of the largest object's shape on the mean
                      latent, one of each object's shape on the tokens over its place (probe_shape_at_place),
                      and encode / decode throughput
    score_folder(...) an image_folder's held-out pictures: reconstruction PSNR (the parser and probe are world-only)
"""

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import documents
import folders
import world


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


def cell_tokens(n_tokens, res=world.RES):
    """For each of the world's 9 places, the latent tokens (of a square grid of n_tokens patches over the
    picture) whose patch overlaps that place's cell: with 16 tokens (8x8 patches of 32 px) each cell overlaps
    2 x 2."""
    g = int(round(n_tokens ** 0.5))
    patch, cell = res / g, res / 3
    span = lambda c: [i for i in range(g) if i * patch < (c + 1) * cell and (i + 1) * patch > c * cell]
    return [[r * g + c for r in span(place // 3) for c in span(place % 3)] for place in range(len(world.PLACES))]


@torch.no_grad()
def object_features(enc, images, scenes, batch_size=256):
    """One row per object: the latents of the tokens over its cell, concatenated (what 'what shape is at P'
    must read), with the object's shape as the label."""
    cells = cell_tokens(enc.n_tokens, enc.res)
    z = torch.cat([enc.encode(data.image_tensor(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
    rows = [(z[k, cells[o.place]].flatten(), world.SHAPES.index(o.shape)) for k, s in enumerate(scenes) for o in s]
    return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def probe_shape_at_place(enc, train_images, train_scenes, images, scenes):
    """A linear probe of each object's shape from the tokens over its cell (object_features), trained on the
    first pictures and scored on the second: whether the latents carry what a question 'what shape is at P'
    reads. None when the tokens do not form a square grid over the picture."""
    if round(enc.n_tokens ** 0.5) ** 2 != enc.n_tokens:
        return None
    with torch.enable_grad():
        return linear_probe(*object_features(enc, train_images, train_scenes), *object_features(enc, images, scenes),
                            len(world.SHAPES))


def psnr(recon, truth):
    return (10 * torch.log10(1 / (recon - truth).square().mean((1, 2, 3)).clamp(min=1e-10))).mean().item()


@torch.no_grad()
def score_folder(enc, image_folder, cache_dir):
    """Reconstruction PSNR of an image_folder's held-out pictures."""
    images = folders.open_images(image_folder, enc.res, cache_dir).pictures('val')[0]
    x = data.image_tensor(images[:1024])
    return {'encoder': enc.name, 'image_folder': image_folder, 'n_val': len(x), 'n_tokens': enc.n_tokens,
            'd_latent': enc.d_latent, 'psnr': psnr(enc.decode(enc.encode(x)).clamp(0, 1), x)}


@torch.no_grad()
def score(enc, n_val=1024, n_probe=4096):
    """Reconstruction of held-out pictures (PSNR, fraction parsing to the true scene), a linear probe of the
    mean latent on the largest object's shape, one of each object's shape from the tokens over its cell
    (probe_shape_at_place), and encode/decode throughput (pictures/s)."""
    images, scenes = documents.world_images('val', n_val, enc.res), documents.world_scenes('val', n_val)
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
    parsed = sum(world.parse(r) == tuple(sorted(s)) for r, s in zip(data.to_uint8(recon), scenes)) / n_val
    train_images, train_scenes = documents.world_images('train', n_probe, enc.res), documents.world_scenes('train', n_probe)
    label = lambda ss: torch.tensor([largest_shape(s) for s in ss])
    with torch.enable_grad():
        probe = linear_probe(mean_latents(enc, train_images), label(train_scenes), mean_latents(enc, images),
                             label(scenes), len(world.SHAPES))
    return {'encoder': enc.name, 'n_tokens': enc.n_tokens, 'd_latent': enc.d_latent, 'psnr': psnr(recon, truth),
            'parse_accuracy': parsed, 'probe_largest_shape': probe, 'probe_chance': 1 / len(world.SHAPES),
            'probe_shape_at_place': probe_shape_at_place(enc, train_images, train_scenes, images, scenes),
            'encode_per_s': n_val / t_enc, 'decode_per_s': n_val / t_dec}
