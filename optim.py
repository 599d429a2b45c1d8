"""
The optimizers: AdamW (Transfusion's, docs/paper.md §5; the paper states none) or Muon for the hidden weight
matrices with AdamW for everything else, as the nanoGPT speedruns and nanochat train.

    optimizer = configure_optimizer(model, 'muon', lr=1e-3, muon_lr=0.02, weight_decay=0.1, betas=(0.9, 0.95))

Muon (Jordan et al. 2024, "MomentUm Orthogonalized by Newton-Schulz"): SGD with Nesterov momentum whose update
for each weight matrix is replaced by the nearest semi-orthogonal matrix, computed by five steps of a quintic
Newton-Schulz iteration, so that every direction of the matrix moves at the same rate. It applies to the
matrices inside the transformer blocks (attention, FFNs, MoE expert banks, one matrix per expert); the
embeddings, the LM head, the latent adapters, the timestep MLP, the slot positions, the MoE routers and every
vector stay with AdamW, as Muon's authors advise for inputs, outputs and gains.
"""

import torch

from configurator import native_bf16_cpu

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # a quintic that pushes every singular value into ~[0.7, 1.2] fast


def orthogonalise(G, steps=5, dtype=torch.bfloat16):
    """~U V^T of G = U S V^T (every singular value mapped to ~1), for a matrix [m, n] or a stack [E, m, n]."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def fan_out_in(p):
    """nn.Linear stores [out, in]; the MoE's expert banks store x @ w, i.e. [E, in, out]."""
    return (p.shape[-1], p.shape[-2]) if p.dim() == 3 else (p.shape[0], p.shape[1])


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights and stacks of them. The step is scaled by sqrt(max(1, fan_out / fan_in)), the
    original rule, so that the learning rate transfers across shapes; decoupled weight decay as AdamW's."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group['momentum'])
                g = p.grad.lerp(buf, group['momentum'])  # Nesterov
                out, inp = fan_out_in(p)
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.add_(orthogonalise(g, dtype=self.ns_dtype), alpha=-group['lr'] * max(1.0, out / inp) ** 0.5)


class Optimizers:
    """Several optimizers stepped as one: what train.py calls step / zero_grad / param_groups / state_dict on."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'optimizers': [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state['optimizers']):
            o.load_state_dict(s)


def is_hidden_matrix(name, p):
    """Muon's parameters: the matrices inside the transformer blocks, except the MoE routers."""
    return name.startswith('blocks.') and p.dim() >= 2 and not name.endswith('router.weight')


def configure_optimizer(model, name, lr, muon_lr, weight_decay, betas, device_type):
    """AdamW on every parameter ('adamw'), or Muon on the hidden matrices and AdamW on the rest ('muon').
    AdamW: matrices decay, vectors (norms, biases) and the latent slot positions do not. Muon's matrices decay
    by the same amount per step as AdamW's would (weight_decay * lr), whatever muon_lr is. Every group
    carries lr_scale: the schedule sets each group's lr to lr_at(step) * lr_scale."""
    named = list(model.named_parameters())
    muon = [p for n, p in named if name == 'muon' and is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in named if not (name == 'muon' and is_hidden_matrix(n, p))]
    decay = [p for n, p in rest if p.dim() >= 2 and n != 'lat_pos']
    no_decay = [p for n, p in rest if p.dim() < 2 or n == 'lat_pos']
    groups = [{'params': decay, 'weight_decay': weight_decay, 'lr_scale': 1.0},
              {'params': no_decay, 'weight_decay': 0.0, 'lr_scale': 1.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == 'cuda')
    if name == 'adamw':
        return adamw
    if name != 'muon':
        raise ValueError(f"optimizer must be adamw or muon, got {name!r}")
    ns_dtype = torch.bfloat16 if device_type == 'cuda' or native_bf16_cpu() else torch.float32
    muon_group = {'params': muon, 'weight_decay': weight_decay * lr / muon_lr, 'lr_scale': muon_lr / lr}
    return Optimizers(adamw, Muon([muon_group], lr=muon_lr, ns_dtype=ns_dtype))
