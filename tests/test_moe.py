"""Tests of moe.py: dispatch parity, the balance loss's closed forms, shared experts, counts, parameter counts,
routing statistics. The whole file runs in well under a minute on 2 CPU cores."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import make_moe as make
from conftest import moe_inputs as inputs
from conftest import value_and_grads
from moe import MoE, balance_loss, expert_hidden, naive_moe, routing_stats

PATHS = ['grouped', 'loop']
SHARED = ['none', 'global', 'modality']


@pytest.mark.parametrize('shared', SHARED)
@pytest.mark.parametrize('dispatch', PATHS)
def test_dispatch_path_matches_per_token_reference_fp32(dispatch, shared):
    m = make(shared, dispatch)
    x, modality = inputs()
    g = torch.randn(x.shape)
    y, grads = value_and_grads(lambda: m(x, modality)[0], m, x, g)
    y_ref, grads_ref = value_and_grads(lambda: naive_moe(m, x, modality), m, x, g)
    assert (m(x, modality)[1]['counts'][:, -1] == 0).all()  # the empty-slice case is exercised
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for (name, _), a, b in zip([('x', x), *m.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda s: f"grad of {name}: {s}")


@pytest.mark.parametrize('shared', SHARED)
@pytest.mark.parametrize('dispatch', PATHS)
def test_dispatch_path_matches_reference_under_bf16_autocast(dispatch, shared):
    """Under CPU bf16 autocast the expert GEMMs run in bf16 (the router stays fp32, so routing is identical).
    Tolerance: every value and gradient within 2% of that tensor's largest magnitude (bf16 keeps 8 bits of
    mantissa, ~0.4% per rounding; measured: at most 0.8%)."""
    m = make(shared, dispatch)
    x, modality = inputs()
    g = torch.randn(x.shape)

    def fast():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return m(x, modality)[0]

    y, grads = value_and_grads(fast, m, x, g)
    y_ref, grads_ref = value_and_grads(lambda: naive_moe(m, x, modality), m, x, g)
    assert y.dtype == torch.float32  # the k expert outputs are summed into the fp32 stream
    for a, b in zip([y, *grads], [y_ref, *grads_ref]):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.02 * b.detach().abs().max().item())


def test_auto_dispatch_falls_back_to_the_loop_when_grouped_mm_strides_do_not_fit():
    """_grouped_mm wants 16-byte row strides; d_model 12 / d_expert 6 break that, and 'auto' runs the loop."""
    torch.manual_seed(0)
    x, modality = torch.randn(20, 12), torch.randint(0, 2, (20,))
    with pytest.raises(RuntimeError):
        MoE(12, 6, 4, 2, dispatch='grouped')(x, modality)
    m = MoE(12, 6, 4, 2, dispatch='auto')
    torch.testing.assert_close(m(x, modality)[0], naive_moe(m, x, modality), atol=1e-6, rtol=1e-5)


def test_grouped_mm_signature_in_this_torch():
    """torch._grouped_mm(a [S, K], b [G, K, N], offs=int32 cumulative row counts) = per-slice a @ b[g],
    with gradients, empty groups included (what _swiglu_grouped relies on)."""
    a = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(3, 8, 4, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    y = torch._grouped_mm(a, b, offs=offs)
    torch.testing.assert_close(y, torch.cat([a[:3] @ b[0], a[3:] @ b[2]]))
    ga, gb = torch.autograd.grad((y * torch.randn(10, 4)).sum(), [a, b])
    assert gb[1].abs().max() == 0 and ga.shape == a.shape


def test_balance_loss_is_its_minimum_one_for_uniform_routing():
    E, k = 8, 2
    m = MoE(16, 8, E, k + 1, shared='modality', balance_coef=0.5)
    with torch.no_grad():
        m.router.weight.zero_()  # P_i = 1/E exactly; then E * sum_i f_i / E = 1 whatever top-k picks
    _, aux = m(torch.randn(64, 16), torch.zeros(64, dtype=torch.long))
    assert aux['balance'].item() == pytest.approx(0.5 * 1.0, abs=1e-6)
    # uniform load and uniform probabilities given directly
    assert balance_loss(torch.full((10, E), 1 / E), torch.full((E,), 5)).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_closed_form_for_collapsed_routing():
    E = 8
    # top-1, every token to expert 0 with probability 1: f = P = e_0, loss = E
    assert balance_loss(F.one_hot(torch.zeros(10, dtype=torch.long), E).float(),
                        torch.tensor([10, 0, 0, 0, 0, 0, 0, 0])).item() == pytest.approx(E)
    # top-k through the layer: experts 0 and 1 win every token with probability 1/2 each: E * k / k^2 = E / k
    k = 2
    m = MoE(16, 8, E, k, shared='none', balance_coef=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:k] = 1.0  # positive inputs: logits 16 * mean(x) > 8 above the rest
    _, aux = m(torch.rand(64, 16) + 0.5, torch.zeros(64, dtype=torch.long))
    assert aux['balance'].item() == pytest.approx(E / k, rel=1e-3)
    assert aux['counts'][0, :k].tolist() == [64, 64]


def test_balance_loss_grows_from_uniform_to_collapsed():
    """Top-1 with f = P = (a, (1-a)/(E-1), ...): loss = E (a^2 + (1-a)^2/(E-1)), 1 at a = 1/E, E at a = 1."""
    E, T = 8, 7000  # counts a T and (1-a) T / 7 are whole numbers
    losses = []
    for a in (1 / E, 0.3, 0.6, 1.0):
        p_E = torch.tensor([a] + [(1 - a) / (E - 1)] * (E - 1))
        loss = balance_loss(p_E.expand(T, E), (p_E * T).round().long()).item()
        assert loss == pytest.approx(E * (a * a + (1 - a) ** 2 / (E - 1)), rel=1e-4)
        losses.append(loss)
    assert losses[0] == pytest.approx(1.0) and losses[-1] == pytest.approx(E) and losses == sorted(losses)


def _ddp_worker(rank, path, out):
    dist.init_process_group('gloo', init_method=f'file://{path}', rank=rank, world_size=2)
    counts = torch.tensor([4, 0]) if rank == 0 else torch.tensor([0, 4])
    out[rank] = balance_loss(torch.tensor([[0.9, 0.1]] * 4), counts).item()
    dist.destroy_process_group()


@pytest.mark.slow
def test_balance_loss_counts_the_load_over_all_ranks():
    """Rank 0's tokens all chose expert 0, rank 1's all chose expert 1, both with P = (0.9, 0.1): globally
    f = (1/2, 1/2) and the loss is 2 (0.45 + 0.05) = 1 on each rank; per rank it would be 1.8 and 0.2."""
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(os.path.join(d, 'store'), out), nprocs=2)
        assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(1.0)


def test_router_z_loss_is_mean_squared_logsumexp():
    m = make('none', 'loop')
    x, modality = inputs()
    _, aux = m(x, modality)
    logits = x.detach().reshape(-1, 16) @ m.router.weight.detach().T
    assert aux['z'].item() == pytest.approx(1e-3 * torch.logsumexp(logits, -1).square().mean().item(), rel=1e-5)


@pytest.mark.parametrize('shared', ['global', 'modality'])
def test_shared_expert_runs_on_every_token_of_its_modality(shared):
    """With the routed experts silenced (w2 = 0), the output is exactly each token's shared expert."""
    m = make(shared, 'grouped')
    with torch.no_grad():
        m.w2.zero_()
    x, modality = inputs()
    y, _ = m(x, modality)
    x_TD, mod_T = x.detach().reshape(-1, 16), modality.reshape(-1)
    for t in range(len(x_TD)):
        s = 0 if shared == 'global' else int(mod_T[t])
        ref = (F.silu(x_TD[t] @ m.s_w1[s]) * (x_TD[t] @ m.s_w3[s])) @ m.s_w2[s]
        torch.testing.assert_close(y.reshape(-1, 16)[t], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('shared, top_k, routed_k', [('none', 4, 4), ('global', 4, 3), ('modality', 4, 3)])
def test_routed_counts_add_up_to_tokens_times_routed_k(shared, top_k, routed_k):
    m = make(shared, 'grouped', top_k=top_k)
    assert m.k == routed_k  # the shared expert takes one of the top_k active slots
    x, modality = inputs()
    _, aux = m(x, modality)
    counts = aux['counts']  # [M, E]
    assert counts.shape == (2, 8) and counts.sum() == x.shape[0] * x.shape[1] * routed_k
    assert counts.sum(1).tolist() == [int((modality == m_).sum()) * routed_k for m_ in (0, 1)]


def test_single_routed_expert_keeps_a_router_gradient():
    """k = 1: the gate is the raw probability (Switch), not a renormalised constant 1."""
    m = make('modality', 'grouped', top_k=2)
    x, modality = inputs()
    y, _ = m(x, modality)
    (grad,) = torch.autograd.grad(y.square().sum(), [m.router.weight])
    assert grad.abs().max() > 0


def test_expert_hidden_from_granularity():
    assert expert_hidden(2048, 16) == 512 and expert_hidden(2048, 1) == 8192 and expert_hidden(256, 16) == 64
    with pytest.raises(ValueError):
        expert_hidden(100, 3)


# the paper's shapes (docs/paper.md §1): d_model 2048, 16 layers, 128,256-token untied embeddings, GQA 32 q / 8 kv
# heads of 64; experts of hidden 512 (G = 16), 16 active per token
D, L, VOCAB = 2048, 16, 128256
NON_FFN = 2 * VOCAB * D + L * (D * D * 2 + 2 * D * 512)  # embeddings + attention (q, o; k, v) = 693.1M


@pytest.mark.parametrize('pool, total', [(32, 2.3e9), (256, 13.5e9), (1008, 51.5e9)])
@pytest.mark.parametrize('shared', ['modality', 'none'])
def test_paper_moe_parameter_counts(pool, total, shared):
    """The paper's expert pools of 32 / 256 / 1008 count its 2 per-modality shared experts (its specialisation
    figure has 254 routed of 256): shared='modality' with pool - 2 routed, top-16 = 1 shared + 15 routed.
    (Counting 32 ROUTED experts plus 2 shared would give 2.40B, 4.5% over the paper's 2.3B.)"""
    n_shared = 2 if shared == 'modality' else 0
    with torch.device('meta'):
        layers = torch.nn.ModuleList(MoE(D, 512, pool - n_shared, 16, shared=shared) for _ in range(L))
    counts = [layer.count_params() for layer in layers]
    model_total = NON_FFN + sum(c[0] for c in counts)
    model_active = NON_FFN + sum(c[1] for c in counts)
    routers = L * D * (pool - n_shared)
    assert abs(model_total / total - 1) < 0.02
    # active = 16 experts of 3 * 2048 * 512 (= one 8192-wide SwiGLU, 1.50B as the dense model) + the routers,
    # which every token runs (33M at 1006 experts: the paper's "1.5B active" leaves them out)
    assert model_active == NON_FFN + L * (16 * 3 * D * 512) + routers
    assert abs((model_active - routers) / 1.5e9 - 1) < 0.01


def test_routing_stats_specialisation_and_classes():
    counts = torch.tensor([[60, 20, 20, 0, 0, 100],   # text tokens' selections (k = 2: 100 text tokens)
                           [0, 60, 20, 20, 0, 0]])    # image tokens' selections (50 image tokens)
    s = routing_stats(counts, top_k_routed=2)
    assert s['N'].tolist() == [100, 50]
    torch.testing.assert_close(s['R'][0], counts[0].double() / 200)
    torch.testing.assert_close(s['R'][1], counts[1].double() / 100)
    # S = (R_t - R_i) / (R_t + R_i): expert 1 (0.1 vs 0.6) -> -5/7; expert 2 (0.1 vs 0.2) -> -1/3
    assert s['S'][0] == 1.0 and s['S'][3] == -1.0 and s['S'][5] == 1.0
    assert s['S'][1].item() == pytest.approx(-5 / 7) and s['S'][2].item() == pytest.approx(-1 / 3)
    assert s['classes'] == ['text', 'vision', 'multimodal', 'vision', 'dead', 'text']
    assert (s['n_text'], s['n_vision'], s['n_multimodal'], s['n_dead']) == (2, 2, 1, 1)
