"""The spine of the test suite: the mask, flow, packing, the model, train.py, sampling, checkpoints and the
scripts end to end. `python -m pytest -q` runs every test file (a few minutes on 2 CPU cores); add
`-m "not slow"` for the quick loop. Shared helpers live in conftest.py; each other concern has its own file."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch._inductor.config

import bench
import data
import documents
import eval as evaluation
import flow
import generate
import model
import pipeline
import rae
import tokenizer
import train
from configurator import knobs
from conftest import ROOT, SMOKE, random_batch, run_main, run_script, run_train, tiny_config
from model import (Attention, Inputs, ModalityFFN, ModelConfig, Route, Transfusion, dense_mask, flex_attention,
                   flex_block_mask, rope_tables)
from world import Obj


# -----------------------------------------------------------------------------
# the hybrid mask

def test_dense_mask_equals_brute_force_rule_on_random_packed_sequences():
    for seed in range(5):
        _, _, b = random_batch(seed)
        mask = dense_mask(b.doc, b.block)
        B, T = b.doc.shape
        for i in range(B):
            for q in range(T):
                for k in range(T):
                    same_doc = b.doc[i, q] == b.doc[i, k]
                    same_block = b.block[i, q] == b.block[i, k] and b.block[i, q] >= 0
                    assert bool(mask[i, 0, q, k]) == bool(same_doc and (k <= q or same_block))


def test_mask_lets_an_image_see_itself_but_not_the_next_image_or_document():
    _, _, b = random_batch(1)
    mask = dense_mask(b.doc, b.block)[:, 0]
    for i in range(b.doc.shape[0]):
        lat = (b.block[i] >= 0).nonzero().squeeze(1)
        for q in lat:
            same = (b.block[i] == b.block[i, q]).nonzero().squeeze(1)
            assert mask[i, q, same].all()                   # bidirectional inside the block
            later_other = (torch.arange(b.doc.shape[1]) > q) & (b.block[i] != b.block[i, q])
            assert not mask[i, q, later_other].any()        # causal across blocks and text


def test_flex_attention_forward_matches_sdpa_on_the_same_mask():
    torch.manual_seed(0)
    _, _, b = random_batch(2, T=128)
    B, T = b.doc.shape
    q, k, v = torch.randn(B, 4, T, 8), torch.randn(B, 2, T, 8), torch.randn(B, 2, T, 8)
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(b.doc, b.block),
                                                               enable_gqa=True)
        out = flex_attention(q, k, v, flex_block_mask(b.doc, b.block))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_model_forward_is_the_same_with_flex_and_sdpa():
    torch.manual_seed(0)
    _, _, b = random_batch(3)
    m = Transfusion(tiny_config()).eval()
    inp = Inputs(b.tokens, b.modality, b.block, b.doc, b.pos, b.lat_idx, b.latents.float(), torch.rand(len(b.lat_idx)))
    with torch.no_grad():
        h_sdpa = m.hidden(inp)[0]
        m.cfg.attn = 'flex'
        h_flex = m.hidden(inp)[0]
    torch.testing.assert_close(h_flex, h_sdpa, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# flow

def test_noising_gives_noise_at_t0_and_data_at_t1():
    x0, noise = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(flow.add_noise(x0, noise, torch.zeros(5)), noise)
    torch.testing.assert_close(flow.add_noise(x0, noise, torch.ones(5)), x0)
    torch.testing.assert_close(flow.add_noise(x0, noise, torch.full((5,), 0.25)), 0.75 * noise + 0.25 * x0)


def test_v_and_x_targets_have_zero_loss_at_the_true_values():
    x0, noise, t = torch.randn(9, 4), torch.randn(9, 4), torch.rand(9) * 0.9
    assert flow.flow_loss(x0 - noise, x0, noise, t, 'v').abs().max() < 1e-10      # v = x0 - noise
    assert flow.flow_loss(x0, x0, noise, t, 'x').abs().max() < 1e-10              # x-pred of the truth
    # a wrong x-prediction costs its error divided by (1 - t), squared
    err = flow.flow_loss(x0 + 1.0, x0, noise, t, 'x')
    torch.testing.assert_close(err, 1 / (1 - t) ** 2)


def test_shift_alpha_matches_the_paper():
    assert abs(flow.shift_alpha(256, 768) - 6.93) < 0.01
    assert abs(flow.shift_alpha(256, 1152) - 8.49) < 0.01
    assert flow.shift_alpha(64, 64) == 1.0


def test_shift_moves_training_times_toward_noise():
    torch.manual_seed(0)
    assert flow.sample_t(20000, 1.0).mean().sub(0.5).abs() < 0.01   # logit-normal is symmetric
    assert flow.sample_t(20000, 4.0).mean() < 0.3                   # alpha > 1: mostly noisy t
    grid = flow.sampling_grid(25, 3.0)
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()


def test_euler_sampler_integrates_a_linear_flow_exactly():
    # straight paths from noise to a fixed x0: v = x0 - noise is constant, so Euler is exact at any step count
    x0, noise = torch.randn(3, 5), torch.randn(3, 5)
    z = flow.euler_sample(lambda z, t, cond: x0 - noise, noise, steps=7, alpha=3.0)
    torch.testing.assert_close(z, x0)
    # the flow dz/dt = z (exponential) tells the direction: integrating from 0 to 1 multiplies by ~e
    z = flow.euler_sample(lambda z, t, cond: z, torch.ones(1), steps=2000, alpha=1.0)
    assert abs(z.item() - math.e) < 2e-3


def test_x_prediction_sampler_lands_on_the_x0_its_loss_is_zero_for():
    # a network whose x-prediction is the truth has zero training loss (above); through generate.sample_image
    # (the same to_velocity as the loss) its Euler steps must then land on that truth: sampler and loss agree
    tok = tokenizer.Tokenizer()
    m = Transfusion(tiny_config(flow_target='x', shift=3.0)).eval()
    x0 = torch.randn(m.cfg.n_latent, m.cfg.d_latent)

    class Oracle(torch.nn.Module):
        def forward(self, h):
            return x0.expand(*h.shape[:-1], -1)
    m.lat_out = Oracle()
    for steps in (10, 25):          # planning's and eval's
        doc = generate.start_doc(m, tok, ['a caption'], 2)
        z = generate.sample_image(m, tok, doc, None, steps, 1.0, torch.Generator().manual_seed(0))
        torch.testing.assert_close(z, x0.expand(2, -1, -1))
        t = flow.sampling_grid(steps, 3.0)[:-1]
        assert (1 - t).min() > flow.T_EPS   # no Euler step starts where the loss clamps 1 - t


def test_cfg_extrapolates_from_unconditional_to_conditional():
    v_c, v_u = torch.full((2,), 2.0), torch.full((2,), 1.0)
    z = flow.euler_sample(lambda z, t, cond: v_c if cond else v_u, torch.zeros(2), steps=4, alpha=1.0,
                          cfg_scale=3.0)
    torch.testing.assert_close(z, torch.full((2,), 1.0 + 3.0 * (2.0 - 1.0)))


# -----------------------------------------------------------------------------
# packing (tokenizers and world documents: test_data.py)

def test_pack_then_unpack_gives_back_the_documents():
    tok, rows, b = random_batch(4)
    for i, docs in enumerate(rows):
        back = data.unpack(b, tok, i)
        assert len(back) == len(docs)
        for d0, d1 in zip(docs, back):
            merged = []  # adjacent text runs merge in the token stream
            for s in d0:
                if isinstance(s, str) and merged and isinstance(merged[-1], str):
                    merged[-1] += s
                elif not (isinstance(s, str) and s == ''):
                    merged.append(s)
            assert len(merged) == len(d1)
            for s0, s1 in zip(merged, d1):
                if isinstance(s0, str):
                    assert s0 == s1
                else:
                    assert s0.target == s1.target and torch.equal(s0.latents, s1.latents)


def test_packing_puts_lm_targets_on_text_only_and_flow_on_target_blocks_only():
    tok, _, b = random_batch(5)
    has_target = b.targets >= 0
    assert not (has_target & (b.modality == 1)).any()
    assert torch.equal(b.text_idx, has_target.flatten().nonzero().squeeze(1))   # the LM head's positions
    assert torch.equal(b.lat_idx, (b.modality == 1).flatten().nonzero().squeeze(1))
    assert len(b.lat_target) == len(b.lat_idx) == len(b.latents) and b.lat_target.any() and not b.lat_target.all()
    assert (b.targets[b.doc < 0] == -1).all()             # no loss on padding
    # targets are the next token within the document
    i, j = has_target.nonzero()[0]
    assert b.targets[i, j] == b.tokens[i, j + 1] and b.doc[i, j] == b.doc[i, j + 1]


def test_pixel_encoder_round_trips_exactly():
    enc = rae.PixelEncoder(32, 4)
    x = torch.rand(4, 3, 32, 32)
    enc.fit(x)
    z = enc.encode(x)
    assert z.shape == (4, 64, 48)
    torch.testing.assert_close(enc.decode(z), x, atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# model

def paper_config(ffn):
    return ModelConfig(vocab_size=128256, block_size=4096, d_model=2048, n_layer=16, n_head=32, n_kv_head=8,
                       d_ff=8192, ffn=ffn, d_latent=1152, n_latent=256)


def test_paper_parameter_counts_dense_1_5b_and_modality_split_2_3b():
    with torch.device('meta'):
        dense = Transfusion(paper_config('dense')).count_params()
        split = Transfusion(paper_config('modality')).count_params()
    assert abs(dense['total'] / 1.50e9 - 1) < 0.02 and dense['active'] == dense['total']
    assert abs(split['total'] / 2.30e9 - 1) < 0.02
    assert abs(split['active'] / 1.50e9 - 1) < 0.02


@pytest.mark.parametrize('shape,start', [((7,), 0), ((40, 24), 0), ((40, 24), 13), ((1023, 4099), 0),
                                         ((3, 1 << 20), 0), ((5, 1 << 20), 2), ((2, 3, 5), 1)])
def test_init_rows_equal_rows_of_whole_blocks(shape, start):
    """fill_rows draws only the head of a block that the rows need; the values are those of drawing every
    block whole (the rule an FSDP shard relies on to fill the same rows as one process)."""
    local = torch.empty(shape)
    model.fill_rows(local, start, 0.02, 11)
    row = local[0].numel()
    R = max(1, (1 << 22) // row)
    want = torch.cat([torch.randn(R, *shape[1:], generator=torch.Generator().manual_seed(model.seed_of(11, k)))
                      for k in range(start // R, (start + shape[0] - 1) // R + 1)]) * 0.02
    assert torch.equal(local, want[start % R:start % R + shape[0]])


def test_bad_model_config_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match='ffn'):
        tiny_config(ffn='moe2')
    with pytest.raises(ValueError, match='n_kv_head'):
        tiny_config(n_head=4, n_kv_head=3)


@pytest.mark.parametrize('grouped', [True, False])
def test_modality_ffn_routes_each_token_through_its_own_ffn(grouped):
    """Both paths (one grouped matmul per weight, or two matmuls on slices) equal each FFN on its own tokens,
    in values and in the gradients of every weight."""
    torch.manual_seed(0)
    f = ModalityFFN(8, 16)
    x = torch.randn(2, 5, 8, requires_grad=True)
    modality = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]])
    g = torch.randn(2, 5, 8)
    out = f(x, Route.of(modality, int(modality.sum()), grouped))
    grads = torch.autograd.grad((out * g).sum(), [x, *f.parameters()])
    ref = torch.zeros_like(out)
    ref[modality == 0], ref[modality == 1] = f.text(x[modality == 0]), f.vision(x[modality == 1])
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad((ref * g).sum(), [x, *f.parameters()])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('qk_norm', [True, False])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(qk_norm):
    torch.manual_seed(0)
    cfg = tiny_config(qk_norm=qk_norm)
    attn = Attention(cfg)
    x = torch.randn(2, 8, cfg.d_model)
    cos, sin = rope_tables(cfg.d_model // cfg.n_head, 8, cfg.rope_base)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    before = attn(x, cos, sin, mask)
    with torch.no_grad():
        attn.wq.weight.mul_(30.0)
        attn.wk.weight.mul_(30.0)
    same = torch.allclose(attn(x, cos, sin, mask), before, atol=1e-4)
    assert same == qk_norm


@pytest.mark.parametrize('ffn', ['dense', 'modality', 'moe'])
def test_bf16_autocast_step_matches_fp32_for_every_ffn(ffn):
    """The mixed-precision step train.py takes on CUDA and on CPUs with native bf16: same loss as fp32 to
    bf16 rounding, and fp32 gradients for every parameter."""
    _, _, b = random_batch(5)
    torch.manual_seed(0)
    m = Transfusion(tiny_config(ffn=ffn, moe_experts=4, moe_top_k=2, d_ff=64))
    torch.manual_seed(1)
    ref, _ = m(b)
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, _ = m(b)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.dtype == torch.float32 and p.grad.isfinite().all(), name


@pytest.mark.parametrize('target', ['v', 'x'])
def test_tiny_model_overfits_one_batch_both_losses_fall(target):
    torch.manual_seed(0)
    _, _, b = random_batch(6)
    m = Transfusion(tiny_config(flow_target=target, d_model=64))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        torch.manual_seed(step % 4)  # the same four (t, noise) draws over and over: a fixed batch to memorise
        loss, met = m(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if first is None:
            first = met
    # stated factors: the LM loss falls at least 10x (random bytes -> memorised), the flow loss at least 2x
    assert met['lm_loss'] < first['lm_loss'] / 10
    assert met['flow_loss'] < first['flow_loss'] / 2


# -----------------------------------------------------------------------------
# train.py: bad input is refused before any work starts

@pytest.mark.parametrize('args, words', [
    (['--no_such_key=1'], "unknown config key 'no_such_key'"),
    (['--max_iters=abc'], "config key 'max_iters' wants int"),
    (['config/missing.py'], "config file 'config/missing.py' does not exist"),
    (['--max_iters'], 'must look like --key=value'),
])
def test_train_refuses_bad_flags_with_one_clear_sentence(args, words):
    r = run_main('train.py', *args)
    assert r.returncode != 0
    assert words in r.stderr
    assert 'Traceback' not in r.stderr


def test_config_default_file_states_the_train_defaults():
    defaults = {**pipeline.run_knobs(), **knobs(vars(train))}
    scope = {}
    exec(open(os.path.join(ROOT, 'config', 'default.py')).read(), {}, scope)
    for key, value in scope.items():
        assert defaults[key] == value, f"config/default.py says {key}={value!r}, the default is {defaults[key]!r}"


def test_each_knob_is_declared_once_and_train_py_sets_every_component_knob():
    homes = {'data.py': data.KNOBS, 'model.py': model.KNOBS, 'rae.py': rae.KNOBS, 'train.py': knobs(vars(train)),
             'bench.py': knobs(vars(bench))}
    seen = {}
    for home, keys in homes.items():
        for k in keys:
            assert k not in seen, f"{k} is declared in {seen[k]} and in {home}"
            seen[k] = home
    assert {'tau', 'feat_weight', 'gan_weight', 'gan_start', 'rae_images', 'n_images'} <= set(pipeline.run_knobs())


def test_lr_warms_up_then_follows_a_cosine_to_min_lr_at_lr_decay_iters():
    cfg = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0, schedule='cosine')
    assert train.lr_at(0, cfg) == pytest.approx(1e-4) and train.lr_at(9, cfg) == pytest.approx(1e-3)
    assert train.lr_at(100, cfg) == pytest.approx(1e-4)
    cfg['lr_decay_iters'] = 200  # a run stopped at 100 of a 200-step schedule: 95 / 190 of the way down
    assert train.lr_at(105, cfg) == pytest.approx(5.5e-4) and train.lr_at(100, cfg) > 5.5e-4


def test_wsd_holds_the_peak_then_cools_down_linearly_to_min_lr():
    cfg = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, lr_decay_iters=0, schedule='wsd',
               cooldown=0.5)
    assert train.lr_at(10, cfg) == train.lr_at(60, cfg) == pytest.approx(1e-3)   # stable for half the steps
    assert train.lr_at(85, cfg) == pytest.approx(5.5e-4)                          # half-way down the line
    assert train.lr_at(110, cfg) == pytest.approx(1e-4)


# -----------------------------------------------------------------------------
# sampling: the KV cache changes nothing but speed

class ForceBOI(torch.nn.Module):
    """An LM head that always prefers <BOI>, so generation takes the image path every time."""
    def __init__(self, head, boi):
        super().__init__()
        self.head, self.boi = head, boi

    def forward(self, h):
        logits = self.head(h)
        return logits.index_add(-1, torch.tensor([self.boi]), torch.full((*logits.shape[:-1], 1), 1e3))


def test_cached_and_uncached_sampling_give_the_same_tokens_and_latents():
    torch.manual_seed(0)
    tok = tokenizer.Tokenizer()
    m = Transfusion(tiny_config(block_size=128)).eval()
    torch.nn.init.normal_(m.lat_out.weight, std=0.5)  # a non-trivial velocity field
    prompt = ['a red', documents.Visual(None, False, torch.randn(4, 6)), 'circle']
    ids_c, _ = generate.generate(m, tok, prompt, B=2, max_new_tokens=12, temperature=1.0, seed=3, use_cache=True)
    ids_u, _ = generate.generate(m, tok, prompt, B=2, max_new_tokens=12, temperature=1.0, seed=3, use_cache=False)
    assert ids_c.shape[1] > 3 and torch.equal(ids_c, ids_u)
    z_c = generate.text_to_image(m, tok, 'a red circle', B=2, steps=5, seed=1, use_cache=True)
    z_u = generate.text_to_image(m, tok, 'a red circle', B=2, steps=5, seed=1, use_cache=False)
    torch.testing.assert_close(z_c, z_u, atol=1e-4, rtol=1e-4)
    m.lm_head = ForceBOI(m.lm_head, tok.boi)  # interleaved: two generated images, each fed back as context
    ids_c, imgs_c = generate.generate(m, tok, ['hi'], max_new_tokens=2, steps=3, use_cache=True)
    ids_u, imgs_u = generate.generate(m, tok, ['hi'], max_new_tokens=2, steps=3, use_cache=False)
    assert len(imgs_c) == len(imgs_u) == 2 and torch.equal(ids_c, ids_u)
    for a, b in zip(imgs_c, imgs_u):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(imgs_c[0], imgs_c[1])  # the second image saw the first


# -----------------------------------------------------------------------------
# sample.py and eval.py from a real (tiny) checkpoint

@pytest.mark.slow
def test_sample_answers_a_question_about_a_picture(tiny_ckpt):
    r = run_script('sample.py', f'--ckpt={tiny_ckpt}', '--mode=i2t', '--max_new_tokens=4',
                   '--prompt=q: how many objects are there? a:')
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[i2t] 'q: how many objects are there? a:' -> " in r.stdout and '(truth: ' in r.stdout


@pytest.mark.slow
def test_sample_writes_a_png_grid_that_reads_back(tiny_ckpt, tmp_path):
    r = run_script('sample.py', f'--ckpt={tiny_ckpt}', '--mode=t2i', '--n=3', '--steps=2', f'--out_dir={tmp_path}',
                   '--prompt=a small red circle at the top left.')
    assert r.returncode == 0, r.stderr[-2000:]
    img = iio.imread(tmp_path / 't2i.png')
    assert img.shape == ((32 + 1) * 4 + 4, 3 * (32 + 1) * 4 + 4, 3) and img.dtype == np.uint8


@pytest.mark.slow
def test_sample_writes_a_rollout_gif_of_the_model_above_the_true_world(tiny_ckpt, tmp_path):
    r = run_script('sample.py', f'--ckpt={tiny_ckpt}', '--mode=rollout', '--steps=2', f'--out_dir={tmp_path}',
                   '--actions=right x2, up; action: dx=-1, dy=+3')
    assert r.returncode == 0, r.stderr[-2000:]
    frames = iio.imread(tmp_path / 'rollout.gif', index=None)   # 4 context frames, then 2 predicted
    assert frames.shape[:3] == (4 + 2, 2 * 32 * 4, 32 * 4)


@pytest.mark.slow
def test_eval_writes_every_score_with_its_chance_level(tiny_ckpt, tmp_path):
    out = tmp_path / 'eval.json'
    r = run_script('eval.py', f'--ckpt={tiny_ckpt}', '--n_batches=1', '--n_prompts=2', '--steps=2',
                   '--n_per_cell=2', '--n_rollouts=2', '--n_plans=1', '--plan_steps=2', f'--out={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res['text_ppl'] > 1 and res['diffusion_loss_t0.5'] > 0
    assert set(res['gen_1obj_heldout']) == {'color', 'shape', 'position', 'object', 'count', 'scene'}
    assert res['text_loss_per_byte'] > 0
    u = res['understanding']
    assert 0 < u['chance'] < 1 and 0 <= u['accuracy'] <= 1 and u['n'] == 7 * 3 * 2
    # every (kind, object count) cell holds n_per_cell questions, and says how many
    assert all(set(k['by_objects']) == {'1', '2', '3'} and all(c['n'] == 2 for c in k['by_objects'].values())
               for k in u['by_kind'].values())
    # the best constant answer of a kind gets at least one of its questions right
    assert all(k['majority'] * k['n'] >= 1 for k in u['by_kind'].values()) and u['majority'] <= 1
    assert res['world_model']['ate'] >= 0 and res['planning']['cem_position_error'] >= 0  # smoke trains on clips


def test_scene_scores_count_each_attribute():
    true = (Obj(0, 'red', 'circle', 'small'), Obj(4, 'blue', 'square', 'large'))
    pred = (Obj(0, 'red', 'square', 'small'), Obj(8, 'blue', 'square', 'large'))
    s = evaluation.score_scene(pred, true)
    assert s == {'color': 1.0, 'shape': 0.5, 'position': 0.5, 'object': 0.0, 'count': 1.0, 'scene': 0.0}
    assert evaluation.score_scene(true, true)['scene'] == 1.0


@pytest.mark.parametrize('args, words', [
    (['--ckpt=nowhere/ckpt.pt'], 'no checkpoint at nowhere/ckpt.pt'),
    (['--mode=i2t', '--image=README.md'], 'cannot read image README.md'),
    (['--prompt=' + 'x' * 600], 'this model\'s context leaves room for'),
    (['--mode=dream'], 'mode must be'),
    (['--mode=rollout', '--actions=left; jump'], "cannot read the action 'jump'"),
    (['--mode=rollout', '--actions=left x90'], 'walk off the map'),
])
@pytest.mark.slow
def test_sample_refuses_bad_input_with_one_clear_sentence(tiny_ckpt, args, words):
    if not any(a.startswith('--ckpt') for a in args):
        args = [f'--ckpt={tiny_ckpt}', *args]
    r = run_main('sample.py', *args)
    assert r.returncode != 0 and words in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.slow
def test_sample_refuses_a_wrong_size_image_and_an_incompatible_checkpoint(tiny_ckpt, tmp_path):
    iio.imwrite(tmp_path / 'big.png', np.zeros((40, 40, 3), np.uint8))
    r = run_main('sample.py', f'--ckpt={tiny_ckpt}', '--mode=i2t', f'--image={tmp_path / "big.png"}')
    assert r.returncode != 0 and 'is 40x40; this model reads 32x32' in r.stderr
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck['model'].pop('lm_head.weight')
    torch.save(ck, tmp_path / 'broken.pt')
    r = run_main('sample.py', f'--ckpt={tmp_path / "broken.pt"}')
    assert r.returncode != 0 and 'not a compatible checkpoint' in r.stderr and 'Traceback' not in r.stderr


# -----------------------------------------------------------------------------
# reliability: exact resume, DDP, atomic checkpoints, SIGTERM

def final_state(out):
    """A run's last checkpoint with its weights whole, from a single file or a sharded (FSDP) folder."""
    ck = pipeline.read_checkpoint(str(out / 'ckpt.pt'))
    if 'dcp' in ck:
        net = Transfusion(ModelConfig(**ck['model_config']))
        pipeline.load_state(net, None, ck)
        ck['model'] = net.state_dict()
    return ck


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_bit_identical_weights(tmp_path):
    args = [*SMOKE, '--max_iters=8', '--eval_interval=2']
    assert run_train(*args, f'--out_dir={tmp_path / "a"}').returncode == 0
    b = tmp_path / 'b'
    p = subprocess.Popen([sys.executable, 'train.py', *args, f'--out_dir={b}'], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (b / 'ckpt.pt').exists() and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = final_state(b)['step']
    assert killed_at < 8
    r = run_train(*args, f'--out_dir={b}', '--init_from=resume')
    assert r.returncode == 0, r.stderr[-2000:]
    a_state, b_state = final_state(tmp_path / 'a'), final_state(b)
    assert b_state['step'] == 8
    for k in a_state['model']:
        assert torch.equal(a_state['model'][k], b_state['model'][k]), k
    for k, v in a_state['optimizer']['state'].items():
        assert torch.equal(v['exp_avg'], b_state['optimizer']['state'][k]['exp_avg'])


def torchrun(*args):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'train.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """DDP (6 steps at once), and FSDP2 (built on the meta device and initialised shard by shard, writing a
    sharded checkpoint at 3 and resuming from it to 6), on 2 processes x 1 micro-step against 1 process x 2
    micro-steps (3 steps, resumed to 6): the same weights, up to float summation order, and the same logged
    losses. In fp32: under bf16 autocast a last-bit difference in a summed gradient can flip a weight's rounding
    to bf16. (Two processes resuming a whole checkpoint: test_shards.py.)"""
    args = [*SMOKE, '--eval_interval=3', '--batch_size=2', '--dtype=float32']
    one, want = tmp_path / 'one', {}
    for max_iters, resume in ((3, []), (6, ['--init_from=resume'])):
        r = run_train(*args, f'--max_iters={max_iters}', '--grad_accum=2', f'--out_dir={one}', *resume)
        assert r.returncode == 0, r.stderr[-2000:]
        want[max_iters] = final_state(one)
    losses = lambda out: [round(json.loads(line)['loss'], 4) for line in open(out / 'log.jsonl') if '"loss"' in line]
    for mode, legs in (('ddp', ((6, []),)), ('fsdp', ((3, []), (6, ['--init_from=resume'])))):
        two = tmp_path / mode
        for max_iters, resume in legs:
            r = torchrun(*args, f'--max_iters={max_iters}', '--grad_accum=1', f'--out_dir={two}',
                         f'--fsdp={mode == "fsdp"}', *resume)
            assert r.returncode == 0, r.stderr[-3000:]
            got = final_state(two)
            assert got['step'] == want[max_iters]['step'] == max_iters
            for k in got['model']:
                torch.testing.assert_close(got['model'][k], want[max_iters]['model'][k], atol=2e-6, rtol=1e-5)
        assert losses(two) == losses(one), mode


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    m = Transfusion(tiny_config())
    opt = torch.optim.AdamW(m.parameters())
    path = str(tmp_path / 'ckpt.pt')
    pipeline.save_checkpoint(path, m, opt, {'a': 1}, 5, {})

    def dying_save(obj, f):
        with open(f, 'wb') as fh:
            fh.write(b'half a checkpoint')
        raise KeyboardInterrupt('killed mid-write')

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.save_checkpoint(path, m, opt, {'a': 1}, 6, {})
    assert torch.load(path, weights_only=True)['step'] == 5


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / 'run'
    p = subprocess.Popen([sys.executable, 'train.py', *SMOKE, '--max_iters=100000', '--eval_interval=100000',
                          f'--out_dir={out}'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ((out / 'log.jsonl').exists() and '"loss"' in (out / 'log.jsonl').read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out_text, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    assert 'SIGTERM: saved step' in out_text
    assert 0 < final_state(out)['step'] < 100000


@pytest.mark.slow
def test_a_nonfinite_loss_stops_the_run_naming_the_step(tmp_path):
    r = run_train(*SMOKE, '--max_iters=5', '--learning_rate=1e30', '--min_lr=1e30', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and 'at step' in r.stderr and 'Traceback' not in r.stderr
