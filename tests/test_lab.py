"""The lab path at the lab's shapes, shrunk only in width, depth and steps: 224² pictures in 14-pixel patches,
4,096-token rows, the paper's mixture; FSDP2 from the meta device, sharded checkpoints, every rank stopping
together; the memory plan; FLOPs as executed; blocks that compile without graph breaks."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import data
import documents
import memory
import pipeline
import rae
import tokenizer
from conftest import ROOT, random_batch, run_train, tiny_config
from model import ModelConfig, Transfusion

aten = torch.ops.aten
# the paper configs shrunk in width, depth and steps only: their image size, block size and mixture stay
SHRINK = ['--d_model=64', '--n_layer=1', '--n_head=4', '--n_kv_head=2', '--d_ff=128', '--vocab_size=0',
          '--n_images=32', '--batch_size=1', '--compile=False', '--eval_batches=1', '--log_interval=1',
          '--warmup_iters=1']
MOE_SHRINK = ['--moe_experts=6', '--moe_top_k=3', '--moe_d_expert=32']


def torchrun(*args, nproc=2, timeout=300):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                           'train.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_document_kind_builds_a_batch_at_224_with_14_pixel_patches(tmp_path):
    """Stills render at 224²; clips render in the world's 32 pixels and are resized, so their actions keep
    their meaning; every picture ends up as 256 latents of 588 dims, the clips' encoded on the device."""
    enc = rae.build_encoder({'encoder': 'pixel', 'image_size': 224, 'patch_size': 14})
    ds = data.WorldData(tokenizer.get_tokenizer('world'), enc, 4096, 2,
                        'text=1,caption2image=1,image2caption=1,qa=1,video=1,action=1', n_images=8,
                        cache_dir=tmp_path, video_frames=5)
    ds.build_caches()
    b = ds.get('train', 0)
    assert b.tokens.shape == (2, 4096) and len(b.pending) > 0 and b.pixels.shape[1:] == (224, 224, 3)
    assert len(b.latents) == len(b.lat_idx) and len(b.lat_idx) % 256 == 0 and b.latents.shape[1] == 588
    data.encode_pending(b, enc)
    assert len(b.pending) == 0 and b.latents.float().abs().sum(-1).gt(0).all()   # every block filled
    kinds = set()
    for row in range(2):
        for d in data.unpack(b, ds.tok, row):
            n_visual = sum(isinstance(x, documents.Visual) for x in d)
            kinds.add('clip' if n_visual == 5 else 'picture' if n_visual == 1 else 'text')
    assert kinds == {'clip', 'picture', 'text'}
    rng = np.random.default_rng(0)
    clip = documents.video_document('action', rng, 'train', 3, res=224)
    small = documents.video_document('action', np.random.default_rng(0), 'train', 3)
    assert clip[1::2] == small[1::2]                                          # the same walk and action text
    assert all(v.image.shape == (224, 224, 3) for v in clip[::2])


def grouped_mm_flop(a, b, *args, out_shape=None, **kwargs):
    """torch's counter has no formula for _grouped_mm: 2 FLOPs a multiply-add, whichever dim is grouped."""
    return 2 * math.prod(a) * b[-1]


FLOPS = {aten._grouped_mm: grouped_mm_flop,   # and none for the CPU flash kernels: torch's own sdpa formulas
         aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
         aten._scaled_dot_product_flash_attention_for_cpu_backward:
             lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)}


@pytest.mark.parametrize('ffn', ['dense', 'modality', 'moe'])
def test_executed_flops_match_torch_flop_counter(ffn):
    """Transfusion.train_flops' 'executed' count against torch.utils.flop_counter on a forward and backward of
    a real batch (SDPA with the dense mask: every pair computed), within 0.1%; the 6N convention is named
    beside it and counts more (the LM head on every position, the embedding gather, the full window)."""
    torch.manual_seed(0)
    m = Transfusion(tiny_config(ffn=ffn, moe_experts=4, moe_top_k=2, d_model=32, d_ff=64))
    b = random_batch(1)[2]
    with FlopCounterMode(display=False, custom_mapping=FLOPS) as counter:
        loss, _ = m(b)
        loss.backward()
    counted, ours = counter.get_total_flops(), m.train_flops(b)
    assert abs(ours['executed'] / counted - 1) < 1e-3, (ours, counted)
    assert ours['6N'] > ours['executed']


def test_flex_tiles_count_only_what_the_mask_lets_through():
    """With 128-wide tiles, a row of short documents computes far fewer pairs than the dense T x T."""
    m = Transfusion(tiny_config(block_size=1024))
    b = random_batch(0, B=2, T=1024)[2]
    dense, tiled = m.train_flops(b)['executed'], m.train_flops(b, tile=128)['executed']
    assert tiled < dense


@pytest.mark.parametrize('ffn', ['dense', 'modality', 'moe'])
def test_the_memory_plans_activation_term_is_what_a_model_saves_for_its_backward(ffn):
    """memory.activation_bytes_per_token against the bytes a model really saves for its backward per layer
    (storages counted once; a 3-layer model less a 1-layer one), within 25%, in fp32 where every tensor's size
    is unambiguous (under bf16 the plan takes the same counts at 2 bytes). On CPU the SDPA kernel also keeps a
    float copy of the boolean mask per layer (B T² 4 bytes), which flex attention on CUDA does not."""
    saved = []
    for n_layer in (1, 3):
        torch.manual_seed(0)
        cfg = tiny_config(ffn=ffn, d_model=128, n_layer=n_layer, n_head=4, n_kv_head=2, d_ff=384, block_size=256,
                          moe_experts=8, moe_top_k=2)
        m, b = Transfusion(cfg), random_batch(0, B=4, T=256)[2]
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(b)
        saved.append(sum(seen.values()))
    per_layer = (saved[1] - saved[0]) / 2
    estimate = memory.activation_bytes_per_token(cfg, 4) * 4 * 256 + 4 * 256 * 256 * 4
    assert abs(estimate / per_layer - 1) < 0.25, (estimate, per_layer)


@pytest.mark.slow
@pytest.mark.parametrize('ffn', ['modality', 'moe'])
def test_compiled_blocks_have_no_graph_break_compile_once_and_match_eager(ffn, monkeypatch):
    """compile_blocks() over three batches with different numbers of pictures: no graph break, one graph for
    every block and every batch (no recompile after the first), and the eager loss (1e-4 on a loss of ~12;
    inductor told to draw eager's random numbers)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch._inductor.config, 'fallback_random', True)
    torch._dynamo.reset()
    cfg = tiny_config(ffn=ffn, block_size=128, d_model=64, n_head=4, n_kv_head=2, d_ff=128, moe_experts=4, moe_top_k=2)
    torch.manual_seed(0)
    eager, compiled = Transfusion(cfg), Transfusion(cfg).compile_blocks()
    compiled.load_state_dict(eager.state_dict())
    batches = [random_batch(seed, T=128)[2] for seed in (0, 2, 1)]
    assert len({len(b.lat_idx) for b in batches}) > 1            # the picture count changes between steps
    counters.clear()
    for i, b in enumerate(batches):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            torch.manual_seed(1)
            want, _ = eager(b)
            torch.manual_seed(1)
            got, _ = compiled(b)
        got.backward()
        assert abs(want.item() - got.item()) < 1e-4
        assert not counters['graph_break'] and counters['stats']['unique_graphs'] == 1, dict(counters['stats'])


def final_weights(out):
    """A run's last checkpoint: (step, {name: full tensor}), from a whole file or a sharded folder."""
    ck = pipeline.read_checkpoint(str(out / 'ckpt.pt'))
    net = Transfusion(ModelConfig(**ck['model_config']))
    pipeline.load_state(net, None, ck)
    return ck['step'], net.state_dict()


@pytest.mark.slow
def test_paper_modality_shrunk_trains_at_224_saves_and_resumes(tmp_path):
    """config/paper_modality.py at its image size, patch, block size and mixture, shrunk in width and depth:
    2 steps, a checkpoint, and a resume to 3."""
    args = ['config/paper_modality.py', *SHRINK, '--eval_interval=2', f'--out_dir={tmp_path}',
            f'--cache_dir={tmp_path / "cache"}']
    r = run_train(*args, '--max_iters=2')
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(*args, '--max_iters=3', '--init_from=resume')
    assert r.returncode == 0, r.stderr[-3000:]
    assert final_weights(tmp_path)[0] == 3
    log = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert {'val_video_flow_loss', 'val_action_flow_loss'} <= set(log[0])   # the mixture's clips at 224²


@pytest.mark.slow
def test_paper_moe256_shrunk_trains_under_fsdp_from_the_meta_device_and_resumes_in_one_process(tmp_path):
    """config/paper_moe256.py at 224² with 4,096-token rows, shrunk in width, depth and experts, on 2 processes
    with FSDP2 (its config's default): built on the meta device, sharded, 2 steps, a sharded checkpoint
    written by both ranks; then resumed by 1 process without FSDP (2 processes resuming under FSDP: test_all's
    two-process test)."""
    args = ['config/paper_moe256.py', *SHRINK, *MOE_SHRINK, '--eval_interval=2', '--dtype=float32',
            f'--cache_dir={tmp_path / "cache"}']
    out = tmp_path / 'run'
    r = torchrun(*args, '--max_iters=2', f'--out_dir={out}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / 'ckpt' / 'meta.pt').exists() and len(list((out / 'ckpt').glob('*.distcp'))) == 2
    r = run_train(*args, '--max_iters=3', f'--out_dir={out}', '--init_from=resume')
    assert r.returncode == 0, r.stderr[-3000:]
    assert final_weights(out)[0] == 3
    r = torchrun(*args, '--max_iters=4', f'--out_dir={out}', '--init_from=resume')
    assert r.returncode != 0 and 'only sharded checkpoints load into shards' in r.stderr


@pytest.mark.slow
def test_sigterm_to_one_rank_makes_every_rank_save_and_exit(tmp_path):
    """A scheduler's SIGTERM reaching one rank only: the ranks agree on the flag, all finish the same step,
    write one sharded checkpoint together and exit 0 (not a hang in the checkpoint's collectives)."""
    out = tmp_path / 'run'
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          'train.py', 'config/smoke.py', '--max_iters=100000', '--eval_interval=100000',
                          '--log_interval=1', '--fsdp=True', f'--out_dir={out}'],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ((out / 'log.jsonl').exists() and '"loss"' in (out / 'log.jsonl').read_text()):
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.1)
    workers = subprocess.run(['pgrep', '-P', str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGTERM)
    out_text, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert 'SIGTERM: saved step' in out_text
    step = final_weights(out)[0]
    assert 0 < step < 100000


@pytest.mark.slow
@pytest.mark.parametrize('config, total, fits', [('paper_modality', 2.30, True), ('paper_moe256', 13.5, True),
                                                  ('paper_moe1008', 51.5, False)])
def test_paper_configs_report_parameters_and_memory_per_gpu_without_allocating(config, total, fits):
    """2.3B / 13.5B / 51.5B total, 1.5B active, +-2% (active as the paper counts it: embeddings, attention,
    one FFN's worth per layer; the 1008-expert routers alone add 33M, so they are printed apart); and the
    memory per GPU on 8 x 80 GB under FSDP, with its verdict."""
    r = run_train(f'config/{config}.py', '--meta=True', '--gpus=8', '--gpu_gb=80')
    assert r.returncode == 0, r.stderr[-2000:]
    words = r.stdout.split()
    got_total = float(words[words.index('parameters,') - 1].rstrip('B'))
    got_active = float(words[words.index('active') - 1].rstrip('B'))
    got_paper = float(words[words.index('paper-active') - 1].rstrip('B'))
    assert abs(got_total / total - 1) < 0.02 and abs(got_paper / 1.5 - 1) < 0.02
    assert 0 < got_active - got_paper < 0.05  # routers + latent adapters: 10M to 43M
    assert 'per GPU on 8 GPUs' in r.stdout and ('fits 8 x 80 GB' in r.stdout) == fits
    assert 'it needs at least' in r.stdout
