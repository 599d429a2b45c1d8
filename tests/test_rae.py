"""Tests for rae.py (pixel and vit encoders, the RAE decoder, latent cache) and pretrained.py (safetensors, DINOv2)."""

import functools
import http.server
import json
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import documents
import pretrained
import rae
import rae_score
import rae_train
import tokenizer
import world

WEIGHTS = Path(__file__).resolve().parents[2] / 'shared' / 'weights' / 'dinov2-vits14'
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56)


def write_safetensors(path, entries):
    """entries: {name: (dtype string, shape, raw little-endian bytes)} -> a .safetensors file, by hand."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {'dtype': dtype, 'shape': list(shape), 'data_offsets': [offset, offset + len(raw)]}
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b' ' * (-len(h) % 8)   # the format pads the header to 8 bytes with spaces
    Path(path).write_bytes(struct.pack('<Q', len(h)) + h + b''.join(raw for _, _, raw in entries.values()))


def save_state(path, state):
    names = {torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16', torch.int64: 'I64'}
    write_safetensors(path, {k: (names[v.dtype], v.shape, v.contiguous().view(torch.uint8).numpy().tobytes())
                             for k, v in state.items()})


def tiny_state(n_registers=0):
    torch.manual_seed(0)
    m = pretrained.Dinov2Encoder(**TINY, num_register_tokens=n_registers, res=56)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))   # so tokens, LayerScale etc. are not all zeros/ones
    return {k: v for k, v in m.state_dict().items() if k not in pretrained.Dinov2Encoder.LATENT_BUFFERS}


def tiny_folder(folder, state=None, n_registers=0, model_type='dinov2'):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY, model_type=model_type, mlp_ratio=4, layer_norm_eps=1e-6, qkv_bias=True, hidden_act='gelu',
               use_swiglu_ffn=False, num_register_tokens=n_registers)
    (folder / 'config.json').write_text(json.dumps(cfg))
    save_state(folder / 'model.safetensors', tiny_state(n_registers) if state is None else state)
    return folder


@functools.lru_cache(maxsize=None)
def real_model(res):
    if not WEIGHTS.is_dir():
        pytest.skip(f"{WEIGHTS} is absent: no pretrained DINOv2 weights to check against")
    return pretrained.load_dinov2(WEIGHTS, res=res)


# -----------------------------------------------------------------------------


def test_loader_reproduces_reference_outputs_within_readme_tolerance():
    m = real_model(224)
    ref = np.load(WEIGHTS / 'reference.npz')
    assert np.allclose(ref['mean'], pretrained.IMAGENET_MEAN) and np.allclose(ref['std'], pretrained.IMAGENET_STD)
    for s in ('224', '112'):   # 112 checks position-embedding interpolation 37x37 -> 8x8
        with torch.no_grad():
            out = m(torch.from_numpy(ref[f'pixel_values_{s}'])).numpy()
        assert out.shape == ref[f'last_hidden_state_{s}'].shape
        err = np.abs(out - ref[f'last_hidden_state_{s}']).max()
        assert err < 1e-3, f"{s}px: max abs error {err}"   # README: atol=1e-3, rtol=0
    # encode's own preprocessing rebuilds the stored pixel values from the uint8 images
    images = torch.from_numpy(ref['image_uint8_224']).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(m.preprocess(images), torch.from_numpy(ref['pixel_values_224']), atol=1e-6)
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_read_safetensors_round_trips_f32_f16_bf16_i64(tmp_path):
    f32 = [1.0, -2.5, 3.25, 0.1]
    bf16 = [1.5, -2.0, 0.15625]   # exactly representable: bf16 bits are the top half of the f32 bits
    i64 = [0, -7, 2 ** 40]
    write_safetensors(tmp_path / 'x.safetensors', {
        'a': ('F32', (2, 2), struct.pack('<4f', *f32)),
        'b': ('F16', (3,), np.array([0.5, -1.0, 65504.0], dtype='<f2').tobytes()),
        'c': ('BF16', (3, 1), b''.join(struct.pack('<f', v)[2:] for v in bf16)),
        'd': ('I64', (3,), struct.pack('<3q', *i64)),
    })
    t = pretrained.read_safetensors(tmp_path / 'x.safetensors')
    assert t['a'].dtype == torch.float32 and t['a'].tolist() == [[1.0, -2.5], [3.25, np.float32(0.1).item()]]
    assert t['b'].dtype == torch.float16 and t['b'].tolist() == [0.5, -1.0, 65504.0]
    assert t['c'].dtype == torch.bfloat16 and t['c'].shape == (3, 1) and t['c'].flatten().tolist() == bf16
    assert t['d'].dtype == torch.int64 and t['d'].tolist() == i64


def test_truncated_or_foreign_safetensors_file_errors_naming_the_file(tmp_path):
    save_state(tmp_path / 'full.safetensors', tiny_state())
    data = (tmp_path / 'full.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'cut\.safetensors.*truncated'):
        pretrained.read_safetensors(tmp_path / 'cut.safetensors')
    (tmp_path / 'notes.safetensors').write_text('hello, this is not a tensor file at all')
    with pytest.raises(ValueError, match=r'notes\.safetensors.*not a safetensors'):
        pretrained.read_safetensors(tmp_path / 'notes.safetensors')


def test_missing_key_raises_value_error_naming_the_key(tmp_path):
    state = tiny_state()
    del state['encoder.layer.1.layer_scale2.lambda1']
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layer\.1\.layer_scale2\.lambda1'.*\(32,\)"):
        pretrained.load_dinov2(tiny_folder(tmp_path / 'm', state), res=56)


def test_wrong_shape_raises_value_error_naming_key_and_both_shapes(tmp_path):
    state = tiny_state()
    state['encoder.layer.0.mlp.fc1.weight'] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.mlp\.fc1\.weight' has shape \(64, 32\), "
                                         r"expected \(128, 32\)"):
        pretrained.load_dinov2(tiny_folder(tmp_path / 'm', state), res=56)


def test_unexpected_key_raises_value_error_naming_the_key(tmp_path):
    state = tiny_state()
    state['pooler.dense.weight'] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"unexpected key 'pooler\.dense\.weight'"):
        pretrained.load_dinov2(tiny_folder(tmp_path / 'm', state), res=56)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_download_fills_cache_then_loads_offline_and_unreachable_url_gives_one_clear_error(tmp_path):
    # a local stand-in for huggingface.co: {root}/{repo}/resolve/main/{file}
    repo = 'someone/tiny-dinov2'
    tiny_folder(tmp_path / 'www' / repo / 'resolve' / 'main')
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path / 'www'), **kw)

        def log_message(self, fmt, *args):
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}'
    cache = tmp_path / 'cache'
    try:
        with pytest.raises(RuntimeError, match='sha256'):   # a bad checksum leaves nothing in the cache
            pretrained.load_dinov2(repo, res=56, cache_dir=cache, base_url=url, sha256='0' * 64)
        assert not (cache / 'someone--tiny-dinov2' / 'model.safetensors').exists()
        first = pretrained.load_dinov2(repo, res=56, cache_dir=cache, base_url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert any(p.endswith('/resolve/main/model.safetensors') for p in requested)
    assert sorted(p.name for p in (cache / 'someone--tiny-dinov2').iterdir()) == [
        'config.json', 'config.json.sha256', 'model.safetensors', 'model.safetensors.sha256']

    # server gone: the second load must come from the cache alone
    second = pretrained.load_dinov2(repo, res=56, cache_dir=cache, base_url=url)
    for k, v in first.state_dict().items():
        assert torch.equal(v, second.state_dict()[k])

    dead = f'http://127.0.0.1:{_free_port()}'
    with pytest.raises(RuntimeError, match='cannot reach .*offline'):
        pretrained.load_dinov2(repo, res=56, cache_dir=tmp_path / 'empty_cache', base_url=dead)
    assert not any(p.is_file() for p in (tmp_path / 'empty_cache').rglob('*'))


def test_position_embeddings_interpolate_to_112_and_224_grids():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 40)   # world-sized images: encode resizes them to res
    for res, n in ((112, 64), (224, 256)):
        enc = pretrained.Dinov2Encoder(res=res)   # ViT-S/14 shapes with a 37x37 stored grid; values don't matter here
        assert enc.n_tokens == n and enc.d_latent == 384
        assert enc.encode(x).shape == (2, n, 384)


def test_encode_drops_cls_and_registers_and_fit_standardises_each_channel(tmp_path):
    enc = pretrained.load_dinov2(tiny_folder(tmp_path / 'm', n_registers=4, model_type='dinov2_with_registers'), res=42)
    assert enc.embeddings.register_tokens.shape == (1, 4, 32) and enc.embeddings.pos_antialias
    torch.manual_seed(0)
    images = torch.rand(12, 3, 30, 30)
    with torch.no_grad():
        h = enc.trunk(enc.preprocess(images))
    assert h.shape == (12, 1 + 4 + 9, 32)   # CLS, 4 registers, 3x3 patches
    z = enc.encode(images)   # identity normalisation before fit: the affine-free LN of the patch tokens
    assert z.shape == (12, enc.n_tokens, enc.d_latent) == (12, 9, 32)
    assert torch.allclose(z, F.layer_norm(h, (32,), eps=1e-6)[:, 5:], atol=1e-6)

    enc.fit(images, batch_size=5)   # uneven batches exercise the running sums
    z = enc.encode(images).flatten(0, 1)
    assert z.mean(0).abs().max() < 1e-4
    assert (z.std(0) - 1).abs().max() < 1e-3
    assert set(enc.state_dict()) >= {'mean', 'std'}   # the fitted statistics travel with the encoder


# -----------------------------------------------------------------------------
# rae.py: the in-repo vit encoder, the decoder stages, the latent cache

TINY_RAE = dict(encoder='vit', rae_images=96, mae_steps=3, decoder_steps=3, rae_batch=8)


def test_vit_rae_is_built_once_into_the_cache_then_reused(tmp_path, capsys):
    cfg = {**TINY_RAE, 'cache_dir': str(tmp_path)}
    first = rae.build_encoder(cfg)
    assert 'building the vit RAE' in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob('rae-*.pt')] and not list(tmp_path.glob('*.mae.pt'))  # stages cleaned
    second = rae.build_encoder(cfg)
    assert 'reusing the vit RAE' in capsys.readouterr().out
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 32, 32)
    z = second.encode(x)
    assert z.shape == (2, 16, 64) and second.decode(z).shape == (2, 3, 32, 32)
    assert not any(p.requires_grad for p in second.encoder.parameters())   # frozen


def test_mae_encoder_sees_only_the_kept_patches():
    enc = rae.VitEncoder()
    x = torch.rand(1, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9, 63]])
    y = x.clone()
    y[:, :, 8:12, 8:12] = 1 - y[:, :, 8:12, 8:12]   # patch 2*8+2 = 18 is hidden: changing it changes nothing
    torch.testing.assert_close(enc.raw_latents(x, keep), enc.raw_latents(y, keep))
    assert not torch.allclose(enc.raw_latents(x), enc.raw_latents(y))


def test_a_stage_stopped_midway_resumes_to_the_same_weights(tmp_path):
    def stage(path, stop_at=None):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1)
        opt = rae_train.adamw(net.parameters(), 0.1)

        def step_fn(step, gen):
            if step == stop_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 4, generator=gen)
            loss = (net(x) - x.sum(1, keepdim=True)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {}
        rae_train.run_stage('toy', path, [net], [opt], 9, 0.1, step_fn, seed=1, save_every=3)
        return net.weight.detach().clone()

    whole = stage(tmp_path / 'a.pt')
    with pytest.raises(KeyboardInterrupt):
        stage(tmp_path / 'b.pt', stop_at=7)         # killed after the step-6 checkpoint
    assert torch.load(tmp_path / 'b.pt', weights_only=True)['step'] == 6
    assert torch.equal(stage(tmp_path / 'b.pt'), whole)


def test_decoder_training_with_the_adversarial_loss_updates_the_critic(tmp_path):
    enc = rae.VitEncoder().fit(torch.rand(16, 3, 32, 32))
    model = rae.RAE(enc)
    images = documents.world_images('train', 16)
    latents = enc.encode(data.image_tensor(images)).numpy()
    rae_train.train_decoder(model, latents, images, 2, 4, tmp_path / 'd.pt', gan_weight=0.5, gan_start=0)
    state = torch.load(tmp_path / 'd.pt', weights_only=True)['state']
    assert len(state) == 4            # decoder, critic and both optimizers are checkpointed
    assert state[3]['state']          # the critic's optimizer took steps


def test_latent_cache_holds_the_encoding_and_is_rebuilt_when_the_encoder_changes(tmp_path):
    enc = rae.PixelEncoder(32, 4).fit(torch.rand(8, 3, 32, 32))
    cache = data.latent_cache(enc, 'val', 20, tmp_path)
    want = enc.encode(data.image_tensor(list(documents.world_images('val', 20))))
    torch.testing.assert_close(torch.from_numpy(np.asarray(cache, np.float32)), want, atol=5e-3, rtol=1e-3)
    enc.encode = None                 # a second call reads the file: encoding again would fail
    assert np.array_equal(data.latent_cache(enc, 'val', 20, tmp_path), cache)
    enc.std.mul_(2)                   # a changed encoder gets a new cache
    del enc.encode
    data.latent_cache(enc, 'val', 20, tmp_path)
    assert len(list(tmp_path.glob('latents-*.npy'))) == 2


def test_a_transformer_narrower_than_the_latent_gets_a_warning(capsys):
    rae.check_width(32, rae.VitEncoder(d=64))
    assert 'below the vit latent dimension 64' in capsys.readouterr().err
    rae.check_width(64, rae.VitEncoder(d=64))
    assert capsys.readouterr().err == ''


# -----------------------------------------------------------------------------
# pretrained.py: SigLIP 2, checked against transformers' own outputs on a tiny random checkpoint
# (testdata/make_siglip_tiny.py wrote it with transformers; the test needs only this repo)

SIGLIP = Path(__file__).resolve().parent / 'testdata' / 'siglip-tiny'


def test_siglip_loader_reproduces_transformers_at_the_stored_and_an_interpolated_size():
    ref = np.load(SIGLIP / 'reference.npz')
    enc = pretrained.load_siglip2(SIGLIP, res=32)
    for size in (32, 48):
        out = enc(torch.from_numpy(ref[f'x{size}']))    # HF pixel_values: already in [-1, 1]
        torch.testing.assert_close(out, torch.from_numpy(ref[f'ref{size}']), atol=1e-5, rtol=1e-4)
    z = enc.encode(torch.rand(2, 3, 20, 20))            # any picture size is resized to res
    assert z.shape == (2, 16, 32) and not any(p.requires_grad for p in enc.parameters())


def test_siglip_checkpoint_missing_a_vision_key_names_it(tmp_path):
    import shutil
    shutil.copy(SIGLIP / 'config.json', tmp_path / 'config.json')
    state = pretrained.read_safetensors(SIGLIP / 'model.safetensors')
    state.pop('vision_model.post_layernorm.bias')
    save_state(tmp_path / 'model.safetensors', state)
    with pytest.raises(ValueError, match="missing key 'vision_model.post_layernorm.bias'"):
        pretrained.load_siglip2(tmp_path, res=32)


def test_a_coarser_patch_and_other_widths_round_trip_through_the_rae_and_the_packing(tmp_path):
    cfg = {**TINY_RAE, 'cache_dir': str(tmp_path), 'patch_size': 8, 'vit_dim': 32, 'decoder_dim': 48}
    enc = rae.build_encoder(cfg)
    assert (enc.n_tokens, enc.d_latent) == (16, 32) == (rae.n_tokens({**rae.KNOBS, **cfg}), cfg['vit_dim'])
    x = torch.rand(3, 3, 32, 32)
    assert enc.decode(enc.encode(x)).shape == (3, 3, 32, 32)
    ds = data.WorldData(tokenizer.get_tokenizer('world'), enc, 128, 2, 'caption2image=1,qa=1', n_images=32,
                        cache_dir=str(tmp_path))
    b = ds.get('train', 0)
    blocks = b.block[b.block >= 0]
    assert (torch.bincount(blocks)[torch.bincount(blocks) > 0] % 16 == 0).all()   # 16 slots per picture
    first = (b.block[0] == 0).nonzero().squeeze(1)
    assert len(first) == 16 and b.latents.shape[-1] == 32
    assert len(b.latents) == int((b.modality == 1).sum()) and b.latents.abs().sum(-1).gt(0).all()


def test_each_place_is_read_from_the_tokens_whose_patches_overlap_its_cell():
    cells = rae_score.cell_tokens(16)              # 8x8 patches of a 32-px picture: a 4 x 4 grid
    assert cells[0] == [0, 1, 4, 5] and cells[4] == [5, 6, 9, 10] and cells[8] == [10, 11, 14, 15]
    assert all(len(c) == 4 for c in cells) and sorted(set(sum(rae_score.cell_tokens(64), []))) == list(range(64))
    assert rae_score.cell_tokens(9) == [[i] for i in range(9)]   # a 3 x 3 grid: one token a cell
    enc = rae.PixelEncoder(32, 8).fit(torch.rand(4, 3, 32, 32))
    scenes = [world.sample_scene(np.random.default_rng(i)) for i in range(8)]
    images = np.stack([world.render(s) for s in scenes])
    x, y = rae_score.object_features(enc, images, scenes)
    assert len(x) == len(y) == sum(map(len, scenes)) and x.shape[1] == 4 * enc.d_latent
    assert y.tolist() == [world.SHAPES.index(o.shape) for s in scenes for o in s]
    acc = rae_score.probe_shape_at_place(enc, images[:6], scenes[:6], images[6:], scenes[6:])
    assert 0 <= acc <= 1
    enc.n_tokens = 12                                     # no square grid of patches: no cell to read
    assert rae_score.probe_shape_at_place(enc, images[:6], scenes[:6], images[6:], scenes[6:]) is None
