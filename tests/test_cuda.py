"""The CUDA paths, each against the path CI already checks on CPU: flex attention (forward AND backward, which
CPU flex lacks), grouped-GEMM MoE dispatch in bf16, the KV cache, and a compiled bf16 training step.
Skipped, with the reason shown, on machines without a GPU (CI); run on one with `python -m pytest test_cuda.py`."""

import pytest
import torch

import generate
from conftest import make_moe as make
from conftest import moe_inputs as inputs
from conftest import random_batch, tiny_config, value_and_grads
from model import Transfusion
from moe import naive_moe
from optim import configure_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device: these compare CUDA paths')
cuda = torch.device('cuda')


def cuda_config(**kw):
    return tiny_config(block_size=128, d_model=64, **kw)  # head dim 16: the least flex's CUDA kernel takes


def grads_of(m, loss):
    return {n: g for n, g in zip([n for n, _ in m.named_parameters()], torch.autograd.grad(
        loss, list(m.parameters()), allow_unused=True)) if g is not None}


def test_flex_and_sdpa_give_the_same_loss_and_gradients_on_cuda():
    _, _, b = random_batch(3, T=128)
    b = b.to(cuda)
    torch.manual_seed(0)
    m = Transfusion(cuda_config()).to(cuda)
    out = {}
    for attn in ('sdpa', 'flex'):
        m.cfg.attn = attn
        torch.manual_seed(1)  # the same flow times and noise
        loss, _ = m(b)
        out[attn] = loss, grads_of(m, loss)
    torch.testing.assert_close(out['flex'][0], out['sdpa'][0], atol=1e-5, rtol=1e-4)
    assert out['flex'][1].keys() == out['sdpa'][1].keys()
    for name, g in out['sdpa'][1].items():
        torch.testing.assert_close(out['flex'][1][name], g, atol=1e-5, rtol=1e-3, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize('shared', ['none', 'global', 'modality'])
def test_grouped_moe_dispatch_matches_the_reference_in_bf16_on_cuda(shared):
    """torch._grouped_mm runs in bf16 on CUDA: values and gradients within 2% of each tensor's largest
    magnitude of the fp32 per-token reference (the CPU bf16 test's tolerance)."""
    m = make(shared, 'grouped').to(cuda)
    x, modality = inputs()
    x, modality = x.detach().to(cuda).requires_grad_(), modality.to(cuda)
    g = torch.randn(x.shape, device=cuda)

    def fast():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            return m(x, modality)[0]

    y, grads = value_and_grads(fast, m, x, g)
    y_ref, grads_ref = value_and_grads(lambda: naive_moe(m, x, modality), m, x, g)
    for a, b in zip([y, *grads], [y_ref, *grads_ref]):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.02 * b.detach().abs().max().item())


def test_cached_and_uncached_sampling_agree_on_cuda():
    import tokenizer
    torch.manual_seed(0)
    tok = tokenizer.Tokenizer()
    m = Transfusion(cuda_config()).to(cuda).eval()
    torch.nn.init.normal_(m.lat_out.weight, std=0.5)
    ids_c, _ = generate.generate(m, tok, ['a red circle'], B=2, max_new_tokens=12, temperature=1.0, seed=3,
                               use_cache=True)
    ids_u, _ = generate.generate(m, tok, ['a red circle'], B=2, max_new_tokens=12, temperature=1.0, seed=3,
                               use_cache=False)
    assert torch.equal(ids_c, ids_u)
    z_c = generate.text_to_image(m, tok, 'a red circle', B=2, steps=5, seed=1, use_cache=True)
    z_u = generate.text_to_image(m, tok, 'a red circle', B=2, steps=5, seed=1, use_cache=False)
    assert z_c.is_cuda
    torch.testing.assert_close(z_c, z_u, atol=1e-4, rtol=1e-4)


def test_compiled_bf16_flex_step_matches_eager_sdpa_fp32_on_cuda(monkeypatch):
    """What train.py runs on a GPU (compile + flex + bf16 autocast + fused AdamW) against the plainest path:
    the same loss to bf16 rounding, and one optimiser step moves the weights alike."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, 'fallback_random', True)
    _, _, b = random_batch(7, T=128)
    b = b.to(cuda)
    torch.manual_seed(0)
    ref = Transfusion(cuda_config(ffn='modality')).to(cuda)
    fast = Transfusion(cuda_config(ffn='modality', attn='flex')).to(cuda)
    fast.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    loss_ref, _ = ref(b)
    opt = configure_optimizer(fast, 'adamw', 1e-3, 0.02, 0.1, (0.9, 0.95), 'cuda')
    torch.manual_seed(1)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss, _ = torch.compile(fast)(b)
    assert abs(loss.item() - loss_ref.item()) < 0.02 * loss_ref.item()
    loss.backward()
    opt.step()
    moved = [(p - q).abs().max().item() for p, q in zip(fast.parameters(), ref.parameters())]
    assert max(moved) > 0 and all(d < 2e-3 for d in moved)  # AdamW's first step moves each weight <= lr
