"""Tests of the Mixture-of-Experts layer: dispatch parity, balancing, shared experts, counts, statistics."""

import pytest
import torch

from model import ModelConfig, Transfusion
from moe import MoE, naive_moe, routing_stats


def layer(shared, dispatch, E=8, k=3, D=16, Fh=8, seed=0):
    torch.manual_seed(seed)
    m = MoE(D, Fh, E, k, shared=shared, dispatch=dispatch)
    torch.nn.init.normal_(m.router.weight, std=0.5)  # a router that actually prefers some experts
    return m


@pytest.mark.parametrize('shared', ['none', 'global', 'modality'])
@pytest.mark.parametrize('dispatch', ['padded', 'loop', 'grouped'])
def test_every_dispatch_path_matches_the_per_token_reference_values_and_gradients(shared, dispatch):
    m = layer(shared, dispatch)
    x = torch.randn(2, 13, 16, requires_grad=True)
    modality = torch.randint(0, 2, (2, 13))
    y, _ = m(x, modality)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    y_ref = naive_moe(m, x, modality)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *m.parameters()], allow_unused=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-4)


def test_balance_loss_is_one_for_uniform_routing_and_e_over_k_when_collapsed():
    E, k = 8, 2
    m = MoE(16, 8, E, k + 1, shared='modality', balance_coef=1.0)  # k routed + 1 shared
    x = torch.rand(64, 16) + 0.5                  # positive inputs
    modality = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        m.router.weight.zero_()                   # equal scores: P_i = 1/E; f is whatever top-k picks
    _, aux = m(x, modality)
    # with P uniform, E * sum_i f_i / E = sum_i f_i = 1, the minimum, whatever the assignment
    torch.testing.assert_close(aux['balance'], torch.tensor(1.0))
    with torch.no_grad():                         # collapse: experts 0 and 1 win every token with p = 1/2 each
        m.router.weight[:2] = 10.0
    _, aux = m(x, modality)
    # f = P = (1/k, 1/k, 0, ...): E * k * (1/k)^2 = E / k
    torch.testing.assert_close(aux['balance'], torch.tensor(E / k), rtol=1e-4, atol=1e-4)


def test_shared_expert_of_each_modality_sees_every_token_of_that_modality():
    m = layer('modality', 'padded')
    x = torch.randn(40, 16)
    modality = torch.randint(0, 2, (40,))
    seen = {}
    with torch.no_grad():
        for s in (0, 1):  # silence the routed experts and the other shared expert: only expert s remains
            m2 = layer('modality', 'padded')
            m2.w2.zero_()
            m2.s_w2[1 - s].zero_()
            y, _ = m2(x, modality)
            seen[s] = y.abs().sum(-1) > 0
    assert torch.equal(seen[0], modality == 0) and torch.equal(seen[1], modality == 1)


def test_routed_counts_add_up_to_tokens_times_routed_k():
    m = layer('modality', 'padded', E=8, k=4)
    modality = torch.randint(0, 2, (3, 50))
    _, aux = m(torch.randn(3, 50, 16), modality)
    counts = aux['counts']  # [2, E]
    assert counts.sum() == 150 * 3                             # k = 4 active = 1 shared + 3 routed
    assert counts[0].sum() == (modality == 0).sum() * 3 and counts[1].sum() == (modality == 1).sum() * 3


def paper_moe(n_experts):
    """The paper's G = 16 MoE: n_experts of width 512 per layer, of which 2 are the per-modality shared
    experts (its specialisation figure counts 254 routed of 256), and 16 active: 1 shared + 15 routed."""
    return ModelConfig(vocab_size=128256, block_size=4096, d_model=2048, n_layer=16, n_head=32, n_kv_head=8,
                       d_ff=8192, ffn='moe', moe_experts=n_experts - 2, moe_top_k=16, moe_d_expert=512,
                       d_latent=1152, n_latent=256)


@pytest.mark.parametrize('n_experts, total', [(32, 2.3e9), (256, 13.5e9), (1008, 51.5e9)])
def test_paper_moe_parameter_counts(n_experts, total):
    with torch.device('meta'):
        model = Transfusion(paper_moe(n_experts))
    counts = model.count_params()
    assert abs(counts['total'] / total - 1) < 0.02
    # active: the dense 1.5B (16 experts of 512 = one 8192 FFN) plus the routers, which every token runs
    # (2048 x 1006 x 16 layers = 33M at 1008 experts: the paper's "1.5B active" rounds them away)
    routers = sum(b.ffn.router.weight.numel() for b in model.blocks)
    assert abs((counts['active'] - routers) / 1.5e9 - 1) < 0.01


def test_routing_stats_classify_experts_by_specialisation():
    counts = torch.tensor([[90, 10, 50, 0, 0],    # text tokens' choices
                           [10, 90, 50, 30, 0]])  # image tokens' choices
    s = routing_stats(counts, k=1)
    # R_text = counts/150, R_image = counts/180
    torch.testing.assert_close(s['R'][0], counts[0].double() / 150)
    assert s['classes'] == ['text', 'vision', 'multimodal', 'vision', 'dead']
    assert s['S'][3] == -1.0 and s['n_dead'] == 1
    assert (s['n_text'], s['n_vision'], s['n_multimodal']) == (1, 2, 1)
