"""optim.py: Muon's orthogonalisation and step (against torch's own Muon), and the split of the parameters
between Muon and AdamW."""

import pytest
import torch

from conftest import random_batch, tiny_config
from model import Transfusion
from optim import Muon, Optimizers, configure_optimizer, orthogonalise


@pytest.mark.parametrize('shape', [(16, 48), (48, 16), (3, 12, 20)])
def test_orthogonalise_maps_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * torch.logspace(-1, 0.5, shape[-1])   # poorly conditioned on purpose
    s = torch.linalg.svdvals(orthogonalise(G, dtype=torch.float32))
    assert s.min() > 0.5 and s.max() < 1.3   # the quintic's band (it trades exactness for speed)
    s_in = torch.linalg.svdvals(G)
    assert s_in.max() / s_in.min() > 5   # while the input's spread over 5x or more


def test_muon_takes_the_same_step_as_torch_muon_on_matrices():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt_ours = Muon([ours], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    opt_ref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1)
    for step in range(3):
        g = torch.randn(24, 40)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(ours, w, atol=1e-3)


@pytest.mark.parametrize('ffn', ['modality', 'moe'])
def test_muon_and_adamw_split_puts_every_parameter_in_exactly_one_group(ffn):
    m = Transfusion(tiny_config(ffn=ffn, moe_experts=4, moe_top_k=2))
    opt = configure_optimizer(m, 'muon', 1e-3, 0.02, 0.1, (0.9, 0.95), 'cpu')
    assert isinstance(opt, Optimizers)
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())   # all, and none twice
    adamw, muon = opt.optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g['params']}
    names = {n for n, p in m.named_parameters() if id(p) in in_muon}
    assert names and all(n.startswith('blocks.') and not n.endswith('router.weight') for n in names)
    assert 'tok_emb.weight' not in names and 'lm_head.weight' not in names
    if ffn == 'moe':
        assert any(n.endswith('ffn.w1') for n in names)   # the expert banks, a matrix per expert
    # the Muon matrices decay by as much per step as AdamW's (lr * weight_decay)
    g = muon.param_groups[0]
    assert g['lr'] * g['weight_decay'] == pytest.approx(1e-3 * 0.1)


def test_a_muon_run_trains_and_its_state_round_trips():
    torch.manual_seed(0)
    m = Transfusion(tiny_config(d_model=64))
    opt = configure_optimizer(m, 'muon', 3e-3, 0.02, 0.0, (0.9, 0.95), 'cpu')
    b = random_batch(6)[2]
    losses = []
    for step in range(40):
        torch.manual_seed(step % 4)
        loss, _ = m(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
    clone = configure_optimizer(m, 'muon', 3e-3, 0.02, 0.0, (0.9, 0.95), 'cpu')
    clone.load_state_dict(opt.state_dict())
    a, c = opt.optimizers[1].state, clone.optimizers[1].state
    assert all(torch.equal(a[p]['momentum_buffer'], c[p]['momentum_buffer']) for p in a)
