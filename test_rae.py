"""Tests for the DINOv2 loader in rae.py: safetensors reader, key checks, download/cache, reference outputs."""

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

import rae

WEIGHTS = Path(__file__).resolve().parent.parent / 'shared' / 'weights' / 'dinov2-vits14'
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
    m = rae.Dinov2Encoder(**TINY, num_register_tokens=n_registers, res=56)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))   # so tokens, LayerScale etc. are not all zeros/ones
    return {k: v for k, v in m.state_dict().items() if k not in rae.Dinov2Encoder.LATENT_BUFFERS}


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
    return rae.load_dinov2(WEIGHTS, res=res)


# -----------------------------------------------------------------------------


def test_loader_reproduces_reference_outputs_within_readme_tolerance():
    m = real_model(224)
    ref = np.load(WEIGHTS / 'reference.npz')
    assert np.allclose(ref['mean'], rae.IMAGENET_MEAN) and np.allclose(ref['std'], rae.IMAGENET_STD)
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
    t = rae.read_safetensors(tmp_path / 'x.safetensors')
    assert t['a'].dtype == torch.float32 and t['a'].tolist() == [[1.0, -2.5], [3.25, np.float32(0.1).item()]]
    assert t['b'].dtype == torch.float16 and t['b'].tolist() == [0.5, -1.0, 65504.0]
    assert t['c'].dtype == torch.bfloat16 and t['c'].shape == (3, 1) and t['c'].flatten().tolist() == bf16
    assert t['d'].dtype == torch.int64 and t['d'].tolist() == i64


def test_truncated_or_foreign_safetensors_file_errors_naming_the_file(tmp_path):
    save_state(tmp_path / 'full.safetensors', tiny_state())
    data = (tmp_path / 'full.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'cut\.safetensors.*truncated'):
        rae.read_safetensors(tmp_path / 'cut.safetensors')
    (tmp_path / 'notes.safetensors').write_text('hello, this is not a tensor file at all')
    with pytest.raises(ValueError, match=r'notes\.safetensors.*not a safetensors'):
        rae.read_safetensors(tmp_path / 'notes.safetensors')


def test_missing_key_raises_value_error_naming_the_key(tmp_path):
    state = tiny_state()
    del state['encoder.layer.1.layer_scale2.lambda1']
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layer\.1\.layer_scale2\.lambda1'.*\(32,\)"):
        rae.load_dinov2(tiny_folder(tmp_path / 'm', state), res=56)


def test_wrong_shape_raises_value_error_naming_key_and_both_shapes(tmp_path):
    state = tiny_state()
    state['encoder.layer.0.mlp.fc1.weight'] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.mlp\.fc1\.weight' has shape \(64, 32\), "
                                         r"expected \(128, 32\)"):
        rae.load_dinov2(tiny_folder(tmp_path / 'm', state), res=56)


def test_unexpected_key_raises_value_error_naming_the_key(tmp_path):
    state = tiny_state()
    state['pooler.dense.weight'] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"unexpected key 'pooler\.dense\.weight'"):
        rae.load_dinov2(tiny_folder(tmp_path / 'm', state), res=56)


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
            rae.load_dinov2(repo, res=56, cache_dir=cache, base_url=url, sha256='0' * 64)
        assert not (cache / 'someone--tiny-dinov2' / 'model.safetensors').exists()
        first = rae.load_dinov2(repo, res=56, cache_dir=cache, base_url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert any(p.endswith('/resolve/main/model.safetensors') for p in requested)
    assert sorted(p.name for p in (cache / 'someone--tiny-dinov2').iterdir()) == ['config.json', 'model.safetensors']

    # server gone: the second load must come from the cache alone
    second = rae.load_dinov2(repo, res=56, cache_dir=cache, base_url=url)
    for k, v in first.state_dict().items():
        assert torch.equal(v, second.state_dict()[k])

    dead = f'http://127.0.0.1:{_free_port()}'
    with pytest.raises(RuntimeError, match='cannot reach .*offline'):
        rae.load_dinov2(repo, res=56, cache_dir=tmp_path / 'empty_cache', base_url=dead)
    assert not any(p.is_file() for p in (tmp_path / 'empty_cache').rglob('*'))


def test_position_embeddings_interpolate_to_112_and_224_grids():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 40)   # world-sized images: encode resizes them to res
    for res, n in ((112, 64), (224, 256)):
        enc = rae.Dinov2Encoder(res=res)   # ViT-S/14 shapes with a 37x37 stored grid; values don't matter here
        assert enc.n_tokens == n and enc.d_latent == 384
        assert enc.encode(x).shape == (2, n, 384)


def test_encode_drops_cls_and_registers_and_fit_standardises_each_channel(tmp_path):
    enc = rae.load_dinov2(tiny_folder(tmp_path / 'm', n_registers=4, model_type='dinov2_with_registers'), res=42)
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
