"""
Rectified flow on continuous visual latents (the Transfusion side of the model, docs/paper.md §4).

THE CONVENTION, used everywhere in this repo (as in the paper):  t = 1 is CLEAN, t = 0 is pure noise.

    z_t = (1 - t) * noise + t * x0            noise ~ N(0, I)
    v   = d z_t / d t = x0 - noise            the velocity the sampler integrates from t = 0 to t = 1

Formulas taken from code that uses the other convention (RAE / SiT: u = 1 is noise) are converted with
t = 1 - u. Context latents that the model should see clean carry t = 1.

Two prediction targets (docs/paper.md §4):
    v-pred: the network outputs v_pred, loss = mean (v_pred - (x0 - noise))^2
    x-pred: the network outputs x0_pred ("a la JiT"); we turn it into a velocity,
            v_pred = (x0_pred - z_t) / (1 - t), and take the same v-space MSE. 1 - t is clamped below at
            T_EPS so the division stays finite near clean t (the paper does not state the loss space; JiT's
            is v-space, which keeps both targets on one loss scale).
"""

import math

import torch

T_EPS = 0.05  # clamp on 1 - t when turning an x-prediction into a velocity


# -----------------------------------------------------------------------------
# time sampling


def shift_alpha(n_tokens, d_latent):
    """The RAE dimension-dependent shift α = sqrt(N·d / 4096) (docs/paper.md §4). α > 1 moves t toward noise."""
    return math.sqrt(n_tokens * d_latent / 4096)


def shift_noise_level(u, alpha):
    """RAE's shift on a noise level u in [0, 1] (u = 1 is noise): u' = α·u / (1 + (α - 1)·u)."""
    return alpha * u / (1 + (alpha - 1) * u)


def sample_t(shape, alpha, device=None, generator=None):
    """Training times: u ~ logit-normal(0, 1) as RAE's configs draw it, shifted, then t = 1 - u'."""
    u = torch.sigmoid(torch.randn(shape, device=device, generator=generator))
    return 1 - shift_noise_level(u, alpha)


def sampling_grid(steps, alpha, device=None):
    """Times for the Euler sampler, from 0 (noise) to 1 (clean): a uniform grid in u, shifted like training."""
    u = torch.linspace(1, 0, steps + 1, device=device)
    return 1 - shift_noise_level(u, alpha)


# -----------------------------------------------------------------------------
# noising, targets, loss


def add_noise(x0, noise, t):
    """z_t = (1 - t)·noise + t·x0; t broadcasts over the trailing latent dim (t is [...], x0 is [..., d])."""
    t = t.unsqueeze(-1)
    return (1 - t) * noise + t * x0


def to_velocity(pred, z_t, t, target):
    """The network output as a velocity: v-pred is one already; x-pred becomes (x0_pred - z_t) / (1 - t)."""
    if target == 'v':
        return pred
    if target == 'x':
        return (pred - z_t) / (1 - t).clamp(min=T_EPS).unsqueeze(-1)
    raise ValueError(f"unknown flow target {target!r}: use 'v' or 'x'")


def flow_loss(pred, x0, noise, t, target):
    """Per-token MSE in velocity space, averaged over the latent dim: returns [...] (one value per token)."""
    z_t = add_noise(x0, noise, t)
    v_pred = to_velocity(pred, z_t, t, target)
    return (v_pred - (x0 - noise)).pow(2).mean(-1)


# -----------------------------------------------------------------------------
# sampling


@torch.no_grad()
def euler_sample(velocity_fn, noise, steps, alpha, cfg_scale=1.0):
    """Integrate dz/dt = v from t = 0 (z = noise) to t = 1 with Euler steps on the shifted grid.

    velocity_fn(z, t, cond) -> v for cond in {True, False}; t is a python float. With cfg_scale != 1 it is
    classifier-free guidance, v = v_u + s·(v_c - v_u) (docs/paper.md §4, s = 3.0 in the paper).
    """
    ts = sampling_grid(steps, alpha).tolist()
    z = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity_fn(z, t, True)
        if cfg_scale != 1.0:
            v_u = velocity_fn(z, t, False)
            v = v_u + cfg_scale * (v - v_u)
        z = z + (t_next - t) * v
    return z
