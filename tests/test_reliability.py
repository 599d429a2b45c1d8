"""Faults a careful user hits: bad input refused in seconds with one sentence, runs that never save a broken
model, resumes that check the checkpoint first, caches that heal, pictures of any bit depth, strict logs,
verified downloads."""

import http.server
import json
import os
import threading
import time
from contextlib import nullcontext

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import data
import parallel
import pipeline
import pretrained
import rae
import tokenizer
import train
from configurator import configure, json_line, remove_orphans
from conftest import SMOKE, random_batch, run_main, run_script, run_train, tiny_config
from loader import Loader
from model import Transfusion
from optim import configure_optimizer


def refused(r, words):
    return r.returncode != 0 and words in r.stderr and 'Traceback' not in r.stderr


# -----------------------------------------------------------------------------
# non-finite steps never reach the weights or a checkpoint

@pytest.mark.slow
def test_skipping_nonfinite_steps_never_saves_a_broken_model_and_stops_after_a_run_of_skips(tmp_path):
    # the reproduction: a huge learning rate makes the loss finite but the gradient non-finite
    run_train(*SMOKE, '--max_iters=4', '--eval_interval=4', f'--out_dir={tmp_path}')
    good = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    r = run_train(*SMOKE, '--max_iters=12', '--learning_rate=1e6', '--min_lr=1e5', '--warmup_iters=1',
                  '--skip_nonfinite=True', '--eval_interval=1', '--init_from=resume', f'--out_dir={tmp_path}')
    assert refused(r, 'steps in a row were not finite')
    after = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert all(v.isfinite().all() for v in after['model'].values() if v.is_floating_point())
    assert after['step'] >= good['step']


@pytest.mark.slow
def test_a_nonfinite_step_stops_the_run_before_its_update(tmp_path):
    r = run_train(*SMOKE, '--max_iters=8', '--learning_rate=1e6', '--min_lr=1e5', '--warmup_iters=1',
                  f'--out_dir={tmp_path}')
    assert refused(r, 'stopping before the update')
    assert not (tmp_path / 'ckpt.pt').exists()   # nothing was saved, broken or not


def test_a_skipped_step_updates_nothing():
    torch.manual_seed(0)
    m = Transfusion(tiny_config())
    opt = configure_optimizer(m, 'adamw', 1e-3, 0.02, 0.1, (0.9, 0.95), 'cpu')

    class Poisoned:  # step 1's batch has an infinite latent: a non-finite loss and gradient
        def get(self, split, step, index=0, mixture=None):
            b = random_batch(step)[2]
            b.latents[:] = float('inf') if step == 1 else 0.0
            return b

    cfg = {'grad_accum': 1, 'seed': 0, 'grad_clip': 1.0}
    batches = Loader(Poisoned(), start=0)
    run = parallel.Setup(cfg, torch.device('cpu'), nullcontext())
    step = lambda position: train.train_step(m, opt, batches, position, run)[-1]
    assert step(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state_dict()['state'][0].items()}
    assert not step(1)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in opt.state_dict()['state'][0].items())


def test_a_model_with_nonfinite_weights_is_not_saved_over_a_good_checkpoint(tmp_path):
    m = Transfusion(tiny_config())
    opt = torch.optim.AdamW(m.parameters())
    path = str(tmp_path / 'ckpt.pt')
    pipeline.save_checkpoint(path, m, opt, {}, 5, {})
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float('nan')
    with pytest.raises(SystemExit, match='not finite at step 6'):
        pipeline.save_checkpoint(path, m, opt, {}, 6, {})
    assert torch.load(path, weights_only=True)['step'] == 5


# -----------------------------------------------------------------------------
# resume checks the checkpoint against the config before any long work

@pytest.mark.slow
def test_resume_refuses_another_model_shape_or_encoder_naming_the_knobs(tiny_ckpt):
    out = f'--out_dir={tiny_ckpt.parent}'   # (refused before anything is written there)
    r = run_main('train.py', *SMOKE, '--max_iters=8', '--init_from=resume', '--d_model=128', '--patch_size=4', out)
    assert refused(r, 'it was trained with d_model=64, patch_size=8, this run has d_model=128, patch_size=4')
    r = run_main('train.py', *SMOKE, '--max_iters=4', '--init_from=resume', out)
    assert refused(r, 'already at step 4')


def test_resume_allows_what_may_change_and_refuses_what_may_not():
    cfg = {**pipeline.run_knobs(), 'optimizer': 'adamw'}
    ck = {'config': dict(cfg)}
    pipeline.check_resume(ck, {**cfg, 'learning_rate': 1.0, 'mixture': 'text=1', 'decoder_steps': 5}, 'x')
    for key, value in (('n_layer', 3), ('tokenizer', 'byte'), ('mae_steps', 5), ('optimizer', 'muon')):
        with pytest.raises(SystemExit, match=f'{key}='):
            pipeline.check_resume(ck, {**cfg, key: value}, 'x')


# -----------------------------------------------------------------------------
# bad input: one sentence, before any long work

def test_muon_lr_without_muon_is_refused_rather_than_ignored(tmp_path):
    r = run_main('train.py', '--muon_lr=0.01', f'--out_dir={tmp_path}')
    assert refused(r, 'add --optimizer=muon or leave muon_lr out')


def test_a_mixture_typo_is_refused_in_seconds_before_any_rae_work(tmp_path):
    t0 = time.time()
    r = run_main('train.py', '--mixture=text=1,bogus=1', f'--cache_dir={tmp_path / "cache"}')
    assert refused(r, "'bogus=1' names no document kind") and time.time() - t0 < 10
    assert not (tmp_path / 'cache').exists()


@pytest.mark.parametrize('args, words', [
    (['--block_size=48'], 'block_size=48 cannot hold a caption2image document'),
    (['--batch_size=0'], 'batch_size must be at least 1'),
    (['--max_iters=0'], 'max_iters must be at least 1'),
    (['--device=tpu'], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (['--n_head=3'], 'd_model 256 is not divisible by n_head 3'),
    (['--ctx_noise=1'], 'ctx_noise and rollout_noise are noise levels in [0, 1), got 1.0, 0.0'),
    (['--text_source=/no/such/file.txt'], 'cannot read text source /no/such/file.txt'),
    (['--qa_kinds=shapes=2'], "qa_kinds entry 'shapes=2': kinds are color, shape"),
    (['--qa_per_picture=20'], 'block_size=256 cannot hold a qa document'),
    (['--action_drop=1'], 'p_uncond and action_drop must be in [0, 1), got 0.1, 1.0'),
    (['--action_cfg=-1'], 'action_cfg must not be negative, got -1.0'),
])
def test_train_refuses_bad_values_in_seconds(tmp_path, args, words):
    r = run_main('train.py', *args, f'--cache_dir={tmp_path}')
    assert refused(r, words) and not any(tmp_path.iterdir())


@pytest.mark.parametrize('content, words', [(b'', 'is empty'), (b'\x00\x01\x02\xff', 'not UTF-8'),
                                            (b'abc\x00def', 'NUL bytes')])
def test_a_text_source_that_is_not_text_is_refused_naming_the_file(tmp_path, content, words):
    path = tmp_path / 'corpus.txt'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f'{path}.*{words}'):
        data.load_text(str(path))


def test_a_text_url_larger_than_the_cap_is_refused(tmp_path, monkeypatch):
    (tmp_path / 'big.txt').write_text('word ' * 5000)
    server = serve(tmp_path)
    monkeypatch.setattr(data, 'TEXT_MAX_BYTES', 1000)
    try:
        with pytest.raises(ValueError, match='larger than'):
            data.load_text(f'http://127.0.0.1:{server.server_address[1]}/big.txt')
    finally:
        server.shutdown()
        server.server_close()


def test_a_config_file_with_a_syntax_error_names_its_line(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("max_iters = 10\nlearning_rate = = 3\n")
    with pytest.raises(SystemExit, match=f'config file {bad} has a syntax error on line 2'):
        configure({'max_iters': 1, 'learning_rate': 1.0}, [str(bad)])


@pytest.mark.slow
@pytest.mark.parametrize('script, args, words', [
    ('sample.py', ['--steps=0'], 'steps, n and max_new_tokens must be at least 1'),
    ('sample.py', ['--cfg_scale=-1'], 'must not be negative'),
    ('eval.py', ['--n_batches=0'], 'n_batches must be at least 1'),
    ('eval.py', ['--t_grid=0.5,1.5'], 'must lie in [0, 1)'),
    ('eval.py', ['--rollout_noise=1.5'], 'rollout_noise must be -1'),
    ('eval.py', ['--action_cfg=-2'], 'action_cfg must be -1'),
])
def test_sample_and_eval_refuse_bad_values(tiny_ckpt, script, args, words):
    assert refused(run_main(script, f'--ckpt={tiny_ckpt}', *args), words)


@pytest.mark.slow
@pytest.mark.parametrize('script', ['train.py', 'eval.py', 'sample.py', 'bench.py', 'rae.py', 'scaling.py',
                                    'study.py', 'prepare_digits.py'])
def test_every_script_answers_help_with_its_knobs(script):
    r = run_script(script, '--help')
    assert r.returncode == 0 and any(f'--{k}=' in r.stdout for k in ('seed', 'report', 'size', 'preset'))
    if script == 'train.py':
        assert "--learning_rate=0.001" in r.stdout and 'peak learning rate' in r.stdout and '--tau=0.8' in r.stdout


# -----------------------------------------------------------------------------
# caches that heal

def test_a_truncated_latent_cache_and_cached_rae_are_rebuilt_with_a_warning_naming_each(tmp_path, capsys):
    cfg = {'encoder': 'vit', 'rae_images': 64, 'mae_steps': 2, 'decoder_steps': 2, 'rae_batch': 8,
           'cache_dir': str(tmp_path)}
    rae.build_encoder(cfg)
    [built] = tmp_path.glob('rae-vit-*[0-9a-f].pt')
    [latents] = tmp_path.glob('latents-vit-rae-*.npy')
    for f in (built, latents):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    second = rae.build_encoder(cfg)
    err = capsys.readouterr().err
    assert f'cached RAE {built} does not load' in err and f'latent cache {latents} is unusable' in err
    assert second.decode(second.encode(torch.rand(2, 3, 32, 32))).shape == (2, 3, 32, 32)
    assert np.load(latents, mmap_mode='r').shape == (64, 16, 64)


def test_a_latent_cache_of_the_wrong_shape_is_rebuilt(tmp_path, capsys):
    enc = rae.PixelEncoder(32, 8).fit(torch.rand(4, 3, 32, 32))
    good = np.array(data.latent_cache(enc, 'val', 8, tmp_path))  # a copy: the file is overwritten below
    [path] = tmp_path.glob('latents-*.npy')
    np.save(path, np.zeros((8, 3), np.float16))
    again = data.latent_cache(enc, 'val', 8, tmp_path)
    assert 'holds float16 (8, 3)' in capsys.readouterr().err
    np.testing.assert_array_equal(again, good)


def test_orphaned_temp_files_of_a_killed_build_are_removed_and_live_ones_kept(tmp_path):
    dead_pid = 2 ** 22 + 12345   # above the default pid_max: no such process
    orphan = tmp_path / f'latents-vit-train-16-abc.{dead_pid}.tmp.npy'
    live = tmp_path / f'latents-vit-train-16-abc.{os.getpid()}.tmp.npy'
    other = tmp_path / f'rae-vit-0123456789.{dead_pid}.tmp'
    for f in (orphan, live, other):
        f.write_bytes(b'x')
    assert remove_orphans(tmp_path, 'latents-vit-train-16-abc') == [orphan.name]
    assert live.exists() and other.exists() and not orphan.exists()


# -----------------------------------------------------------------------------
# pictures of any bit depth and mode, logs strict JSON, downloads verified

@pytest.mark.parametrize('kind', ['gray16', 'gray8', 'palette', 'rgba', 'gray_alpha', 'rgb'])
def test_one_routine_turns_any_picture_file_into_rgb8(tmp_path, kind):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    gray = rgb[..., 0]
    path = tmp_path / f'{kind}.png'
    if kind == 'gray16':
        iio.imwrite(path, gray.astype(np.uint16) * 257)     # 16-bit: 65535 is white
        want = np.repeat(gray[..., None], 3, -1)
    elif kind == 'gray8':
        iio.imwrite(path, gray)
        want = np.repeat(gray[..., None], 3, -1)
    elif kind == 'palette':
        img = Image.fromarray(rgb).quantize(256)
        img.save(path)
        want = np.asarray(img.convert('RGB'))
    elif kind == 'rgba':
        iio.imwrite(path, np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], -1))
        want = rgb
    elif kind == 'gray_alpha':
        Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), 'LA').save(path)
        want = np.repeat(gray[..., None], 3, -1)
    else:
        iio.imwrite(path, rgb)
        want = rgb
    got = data.to_rgb8(iio.imread(path))
    assert got.dtype == np.uint8 and got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got, want)


def test_transparent_pixels_are_composited_over_black():
    rgba = np.zeros((2, 2, 4), np.uint8) + 200
    rgba[0, 0, 3] = 0
    got = data.to_rgb8(rgba)
    assert (got[0, 0] == 0).all() and (got[1, 1] == 157).all()   # 200 * 200/255


def test_log_lines_are_strict_json_with_null_for_nonfinite_numbers():
    line = json_line({'loss': float('nan'), 'grad_norm': float('inf'), 'load': [1.0, float('-inf')], 'step': 3})
    assert json.loads(line) == {'loss': None, 'grad_norm': None, 'load': [1.0, None], 'step': 3}


def serve(folder, headers=None):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def end_headers(self):
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            super().end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_downloads_are_checked_against_the_servers_sha256_and_a_corrupted_cache_is_fetched_again(tmp_path,
                                                                                                  capsys):
    www = tmp_path / 'www' / 'a' / 'b' / 'resolve' / 'main'
    www.mkdir(parents=True)
    (www / 'f.bin').write_bytes(b'payload' * 100)
    cache = tmp_path / 'cache'
    server = serve(tmp_path / 'www', {'X-Linked-Etag': '"' + '0' * 64 + '"'})
    url = f'http://127.0.0.1:{server.server_address[1]}'
    try:
        with pytest.raises(RuntimeError, match='sha256 is'):   # the server's stated digest disagrees
            pretrained.hf_download('a/b', 'f.bin', cache, url)
    finally:
        server.shutdown()
        server.server_close()
    server = serve(tmp_path / 'www')
    url = f'http://127.0.0.1:{server.server_address[1]}'
    try:
        path = pretrained.hf_download('a/b', 'f.bin', cache, url)
        assert path.read_bytes() == b'payload' * 100
        path.write_bytes(b'tampered')   # the cache no longer matches the digest kept beside it
        path = pretrained.hf_download('a/b', 'f.bin', cache, url)
        assert 'does not match its sha256' in capsys.readouterr().err
        assert path.read_bytes() == b'payload' * 100
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_checkpoint_from_before_qk_norm_loads_without_it(tiny_ckpt, tmp_path):
    ck = torch.load(tiny_ckpt, weights_only=True)
    mcfg = {k: v for k, v in ck['model_config'].items() if k != 'qk_norm'}    # written before the knob existed
    old = Transfusion(pipeline.model.ModelConfig(**mcfg, qk_norm=False))
    ck = {**ck, 'model_config': mcfg, 'model': old.state_dict(),
          'config': {k: v for k, v in ck['config'].items() if k != 'qk_norm'}}
    torch.save(ck, tmp_path / 'old.pt')
    net = pipeline.load_checkpoint(tmp_path / 'old.pt')[0]
    assert net.cfg.qk_norm is False and not any('gain' in n for n, _ in net.named_parameters())


# -----------------------------------------------------------------------------
# data off the critical path: background workers build exactly the batches of the loop, in order

def same_batch(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def test_the_background_loader_yields_the_loops_batches_in_order_across_a_resume(tmp_path):
    enc = rae.build_encoder({'encoder': 'pixel'})
    dataset = data.WorldData(tokenizer.get_tokenizer('world'), enc, 256, 2, 'text=0.3,caption2image=0.3,action=0.4',
                             n_images=64, cache_dir=str(tmp_path))
    dataset.pool('train')
    # rank 1 of 2 processes, 2 micro-steps a step, from position 3: what train.py's loop asks for, in order
    direct = [(p, m, dataset.get('train', p, m * 2 + 1)) for p in range(3, 6) for m in range(2)]
    ahead = Loader(dataset, 3, grad_accum=2, world=2, rank=1, workers=2)
    resumed = Loader(dataset, 5, grad_accum=2, world=2, rank=1, workers=1)
    for want, got in zip(direct + direct[4:], [next(ahead) for _ in range(6)] + [next(resumed) for _ in range(2)]):
        assert want[:2] == tuple(got[:2]) and same_batch(want[2], got[2])


@pytest.mark.slow
def test_a_run_with_data_workers_ends_bit_identical_to_one_without_across_a_resume(tmp_path):
    args = [*SMOKE, '--eval_interval=3']
    assert run_train(*args, '--max_iters=6', f'--out_dir={tmp_path / "loop"}').returncode == 0
    for max_iters, resume in ((3, []), (6, ['--init_from=resume'])):
        r = run_train(*args, f'--max_iters={max_iters}', '--data_workers=2', f'--out_dir={tmp_path / "ahead"}', *resume)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('loop', 'ahead'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_end_to_end_as_a_cpu_dry_run_at_224(tmp_path):
    """bench.py --suite=gpu on the paper configs at 224² and 4,096 tokens, narrowed in width, depth and experts:
    every section completes and writes its numbers (FLOPs executed and by 6N, both MFUs absent without a peak)."""
    out = tmp_path / 'gpu.json'
    r = run_script('bench.py', '--suite=gpu', '--device=cpu', '--suite_layers=1', '--repeats=1', '--warmup=1',
                   '--suite_args=--d_model=64 --n_head=4 --n_kv_head=2 --d_ff=128 --vocab_size=0 --n_images=16 '
                   '--moe_experts=6 --moe_top_k=3 --moe_d_expert=32 --data_workers=1',
                   '--moe_tokens=256', f'--out={out}', f'--cache_dir={tmp_path / "cache"}', timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res['device'] == 'cpu dry run' and 'skipped' in res['test_cuda']['summary']
    assert not [k for k, v in res.items() if isinstance(v, dict) and 'error' in v], res
    dense = res['dense_eager']
    assert dense['config']['block_size'] == 4096 and dense['flops_per_step_executed'] < dense['flops_per_step_6N']
    assert res['moe_vs_dense'] > 0 and 0 <= dense['data_wait_share'] <= 1 and dense['data_workers'] == 1
    assert res['dense_compiled']['config']['compile'] and res['moe']['config']['ffn'] == 'moe'
    assert res['moe_layer']['E64_fast_over_loop'] > 0
