"""
How an RAE is trained (rae.build_encoder runs these stages once and caches the result):

    pretrain_mae(enc, pictures, ...)      the vit encoder, by masked autoencoding on world pictures
    train_decoder(rae, latents, pictures) the pixel decoder that inverts a frozen encoder (docs/paper.md §6)

Every stage runs through run_stage: warmup + cosine, per-step randomness from (seed, step) only, a
checkpoint every few hundred steps (temp file + rename), and resume from it, so a killed build continues.
"""

import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from configurator import save_atomic, seed_of
from vit import ViT


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


def run_stage(name, path, modules, opts, steps, lr, step_fn, seed, save_every=200):
    """The loop every stage shares: warmup + cosine (to 10%) on every optimizer, per-step randomness from
    (seed, step) only, a checkpoint of modules + optimizers every save_every steps, and resume from it (one
    that does not load is moved aside and the stage starts over). A finished stage leaves its checkpoint at
    step == steps, so a rerun skips it."""
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
    (hidden-only loss: 15% of held-out reconstructions parse to the true scene; all patches: 100%)."""
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


class PatchDiscriminator(nn.Module):
    """A small convolutional critic scoring overlapping patches, for the optional adversarial loss."""

    def __init__(self, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, images):
        return self.net(images * 2 - 1)


def train_decoder(rae, latents, images, steps, batch_size, path, seed=0, lr=3e-3, tau=0.8, feat_weight=0.1,
                  gan_weight=0.0, gan_start=0):
    """Train rae.decoder on cached latents [n, N, d] of the uint8 pictures [n, H, W, 3].
    Loss: L1 on pixels + feat_weight * MSE between the re-encoded reconstruction and the latent (a feature
    loss in the encoder's own space, our LPIPS stand-in; 0 turns it off) + an optional hinge adversarial loss
    whose weight adapts to ||grad rec|| / ||grad adv|| at the decoder's last layer (as in RAE/VQGAN, capped at
    1e4), from step gan_start.
    Noise augmentation (docs/paper.md §6: sigma = tau * U(0, 1) per picture): the decoder also learns to decode
    the slightly-off latents a diffusion model produces."""
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
