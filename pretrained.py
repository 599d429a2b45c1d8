"""
Pretrained representation encoders from Hugging Face checkpoints (config.json + model.safetensors), frozen,
for use as RAE encoders (rae.py wraps them with a trained pixel decoder).

    enc = load_dinov2('facebook/dinov2-small')          # a Hugging Face repo id, downloaded once and verified ...
    enc = load_dinov2('weights/dinov2-vits14', res=112)  # ... or a local folder (config.json + model.safetensors)
    z = enc.encode(images)    # [B, 3, H, W] in [0, 1] -> [B, N, d], CLS/registers dropped, normalised

Same boundary as rae.py's encoders: encode / fit / raw_latents, n_tokens, d_latent, res.
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------
# safetensors: read by hand. The format is one little-endian u64 header length, a JSON header
# {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes. That is ~25 lines, so we read
# it ourselves rather than add the `safetensors` package as a dependency for one function.

_ST_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
              'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
              'U8': torch.uint8, 'BOOL': torch.bool}


def read_safetensors(path):
    """Read a .safetensors file into {name: tensor} (CPU, the stored dtype)."""
    assert sys.byteorder == 'little', "safetensors data is little-endian; this reader assumes a little-endian host"
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], 'little') if len(data) >= 8 else None
    if n is None or 8 + n > len(data):
        raise ValueError(f"{path}: truncated or not a safetensors file ({len(data)} bytes, "
                         f"header claims {n} header bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (the header is not JSON: {e})") from None
    header.pop('__metadata__', None)
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if info['dtype'] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not support")
        dtype, (start, end) = _ST_DTYPES[info['dtype']], info['data_offsets']
        numel = 1
        for s in info['shape']:
            numel *= s
        if end > len(body):
            raise ValueError(f"{path}: truncated: tensor {name} ends at data byte {end}, the file has {len(body)}")
        if end - start != numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} spans {end - start} bytes, shape {info['shape']} "
                             f"of {info['dtype']} needs {numel * dtype.itemsize}")
        # bytearray copy: frombuffer wants a writable buffer, and each tensor then owns its memory
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info['shape'])
    return out


# -----------------------------------------------------------------------------
# DINOv2 ViT. Module and parameter names follow Hugging Face's `Dinov2Model` exactly, so a checkpoint's
# state dict loads without renaming.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2PatchEmbeddings(nn.Module):

    def __init__(self, d, patch):
        super().__init__()
        self.projection = nn.Conv2d(3, d, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.projection(x).flatten(2).transpose(1, 2)   # [B, h*w, d], patches row-major


class Dinov2Embeddings(nn.Module):

    def __init__(self, d, patch, image_size, n_registers, pos_antialias):
        super().__init__()
        self.patch, self.grid, self.pos_antialias = patch, image_size // patch, pos_antialias
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))   # only for masked pretraining; kept so keys match
        if n_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, n_registers, d))
        self.patch_embeddings = Dinov2PatchEmbeddings(d, patch)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, d))

    def pos_embed(self, h, w):
        """Position embeddings for an h x w patch grid: the stored grid resized with bicubic interpolation
        to exactly (h, w) (align_corners=False, no '+0.1' offset). That is what HF Dinov2Model and the
        reference ONNX graph do; Meta's original code (scale_factor=(n+0.1)/37) differs by up to 0.45.
        HF's with-registers model does the same but with antialias=True, hence the flag."""
        pos = self.position_embeddings
        if (h, w) == (self.grid, self.grid):
            return pos
        d = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode='bicubic', align_corners=False,
                             antialias=self.pos_antialias).to(pos.dtype)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, d)], dim=1)

    def forward(self, x):
        B, _, H, W = x.shape
        tokens = self.patch_embeddings(x)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed(H // self.patch, W // self.patch)
        if hasattr(self, 'register_tokens'):   # registers go after CLS and carry no position embedding
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(B, -1, -1), tokens[:, 1:]], dim=1)
        return tokens


class Dinov2SelfAttention(nn.Module):

    def __init__(self, d, n_head, qkv_bias):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(d, d, bias=qkv_bias)
        self.key = nn.Linear(d, d, bias=qkv_bias)
        self.value = nn.Linear(d, d, bias=qkv_bias)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)   # bidirectional, scale 1/sqrt(head_dim)
        return y.transpose(1, 2).reshape(B, T, d)


class Dinov2SelfOutput(nn.Module):

    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        return self.dense(x)


class Dinov2Attention(nn.Module):
    # two levels (attention.attention.query, attention.output.dense) only to reproduce HF's key names

    def __init__(self, d, n_head, qkv_bias):
        super().__init__()
        self.attention = Dinov2SelfAttention(d, n_head, qkv_bias)
        self.output = Dinov2SelfOutput(d)

    def forward(self, x):
        return self.output(self.attention(x))


class Dinov2LayerScale(nn.Module):

    def __init__(self, d):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.lambda1


class Dinov2MLP(nn.Module):

    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))   # exact (erf) GELU; the tanh form is off by ~2e-2


class Dinov2Layer(nn.Module):
    """Pre-norm block; each residual branch is scaled per channel by LayerScale."""

    def __init__(self, d, n_head, mlp_hidden, eps, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attention = Dinov2Attention(d, n_head, qkv_bias)
        self.layer_scale1 = Dinov2LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = Dinov2MLP(d, mlp_hidden)
        self.layer_scale2 = Dinov2LayerScale(d)

    def forward(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Stack(nn.Module):

    def __init__(self, n_layer, **block):
        super().__init__()
        self.layer = nn.ModuleList(Dinov2Layer(**block) for _ in range(n_layer))

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return x


class LatentNorm(nn.Module):
    """What every token encoder here shares: raw_latents(images) -> [B, N, d] (defined by the subclass),
    standardised per channel with `mean`/`std` buffers that fit() measures on training pictures (identity
    until then). The buffers travel in the state dict with the encoder."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer('mean', torch.zeros(d))
        self.register_buffer('std', torch.ones(d))

    def fit(self, images, batch_size=64):
        """Measure the latent normalisation over training images [B, 3, H, W] in [0, 1]."""
        mean, std = channel_stats(self.raw_latents, images, batch_size)
        self.mean.copy_(mean)
        self.std.copy_(std)
        return self

    def encode(self, images):
        return (self.raw_latents(images) - self.mean) / self.std


def resize(images, res):
    """[B, 3, H, W] in [0, 1], any size -> [B, 3, res, res]. antialias only acts when shrinking; bicubic
    overshoots, so the result is clamped back into [0, 1]."""
    x = images.float()
    if x.shape[-2:] != (res, res):
        x = F.interpolate(x, size=(res, res), mode='bicubic', align_corners=False, antialias=True).clamp(0, 1)
    return x


class Dinov2Encoder(LatentNorm):
    """Frozen DINOv2 ViT as an RAE encoder: images [B, 3, H, W] in [0, 1] -> latents [B, N, d].

    encode() resizes to `res`, applies the ImageNet normalisation, runs the ViT, applies the final LayerNorm
    *without* its affine (the RAE recipe: keep the LN statistics, drop weight/bias, so every token has zero
    mean and unit variance over channels), drops CLS and registers, then standardises each channel with
    the `mean`/`std` buffers measured by fit() (identity until fit).

    The ViT's parameter names are HF Dinov2Model's; `mean`/`std` (latent normalisation) are the only extra
    state-dict entries, so a checkpoint loads with strict=False, or through load_dinov2, which checks keys."""

    name = 'dinov2'
    LATENT_BUFFERS = ('mean', 'std')   # state-dict entries that are ours, not the checkpoint's

    def __init__(self, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                 image_size=518, layer_norm_eps=1e-6, qkv_bias=True, num_register_tokens=0, pos_antialias=False,
                 res=224):
        super().__init__(hidden_size)
        if res % patch_size:
            raise ValueError(f"encoder resolution {res} is not a multiple of the patch size {patch_size}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_attention_heads} heads")
        self.res, self.patch, self.eps = res, patch_size, layer_norm_eps
        self.n_registers = num_register_tokens
        self.n_tokens = (res // patch_size) ** 2
        self.d_latent = hidden_size
        self.embeddings = Dinov2Embeddings(hidden_size, patch_size, image_size, num_register_tokens, pos_antialias)
        self.encoder = Dinov2Stack(num_hidden_layers, d=hidden_size, n_head=num_attention_heads,
                                   mlp_hidden=int(hidden_size * mlp_ratio), eps=layer_norm_eps, qkv_bias=qkv_bias)
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        # fixed constants, not weights: non-persistent so they never show up as checkpoint keys
        self.register_buffer('pixel_mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('pixel_std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def trunk(self, pixel_values):
        """ImageNet-normalised pixels [B, 3, H, W] -> tokens before the final LayerNorm [B, 1+R+N, d]."""
        return self.encoder(self.embeddings(pixel_values))

    def forward(self, pixel_values):
        """HF's `last_hidden_state`: after the final LayerNorm with its affine, CLS and registers kept.
        (HF's pooler_output is just out[:, 0].) Used to check against reference outputs."""
        return self.layernorm(self.trunk(pixel_values))

    def preprocess(self, images):
        """[B, 3, H, W] in [0, 1], any size -> ImageNet-normalised [B, 3, res, res]."""
        return (resize(images, self.res) - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def raw_latents(self, images):
        """Patch tokens after the affine-free final LayerNorm, before the fitted normalisation: [B, N, d]."""
        h = self.trunk(self.preprocess(images))
        h = F.layer_norm(h, (h.shape[-1],), eps=self.eps)
        return h[:, 1 + self.n_registers:]



@torch.no_grad()
def channel_stats(raw_latents, images, batch_size=64):
    """Per-channel mean/std of raw_latents(images) over images and token positions. Sums in float64, batch by
    batch, so big sets fit in memory. The std is floored at 1e-3: a dead channel must not blow up."""
    s = s2 = 0.
    n = 0
    for i in range(0, len(images), batch_size):
        z = raw_latents(images[i:i + batch_size]).double().flatten(0, 1)
        s, s2, n = s + z.sum(0), s2 + (z * z).sum(0), n + len(z)
    mean = s / n
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    return mean.float(), var.clamp(min=0).sqrt().float().clamp(min=1e-3)


def check_state_dict(model, state, ignore=()):
    """Compare a checkpoint with the model key by key; raise ValueError naming the first problem."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in ignore}
    for k, shape in expected.items():
        if k not in state:
            raise ValueError(f"checkpoint is missing key {k!r} (expected shape {tuple(shape)})")
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"checkpoint key {k!r} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"checkpoint has unexpected key {unexpected[0]!r} (shape {tuple(state[unexpected[0]].shape)})"
                         + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))


# -----------------------------------------------------------------------------
# loading: a local folder (config.json + model.safetensors) or a Hugging Face repo id, downloaded once

HF_BASE_URL = 'https://huggingface.co'


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def stated_sha256(headers):
    """The sha256 a server states for a file: Hugging Face sends it as the ETag of LFS files (X-Linked-Etag
    behind a redirect); None when the tag is not a sha256."""
    tag = headers.get('X-Linked-Etag') or headers.get('ETag') or ''
    tag = tag.removeprefix('W/').strip('"').lower()
    return tag if len(tag) == 64 and all(c in '0123456789abcdef' for c in tag) else None


def hf_download(repo, filename, cache_dir='~/.cache/beyond-llms', base_url=None, sha256=None, timeout=30):
    """Fetch {base_url}/{repo}/resolve/main/{filename} into cache_dir/{owner--name}/ unless already there.
    Streams to a temp file in the same folder and renames it, so an interrupted download never leaves a
    half file that a later run would take for the real one. The download is checked against the size the
    server states and against a sha256 (the caller's, else the server's when it states one); the verified
    digest is kept beside the file (.sha256), and a cached file that no longer matches it (or the caller's
    sha256) is fetched again, with a warning."""
    dest = Path(cache_dir).expanduser() / repo.replace('/', '--') / filename
    sidecar = dest.with_name(dest.name + '.sha256')
    if dest.exists():
        want = sha256 or (sidecar.read_text().strip() if sidecar.exists() else None)
        if want is None or file_sha256(dest) == want.lower():
            return dest
        print(f"warning: the cached {dest} does not match its sha256 {want}: downloading it again",
              file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = f"{(base_url or HF_BASE_URL).rstrip('/')}/{repo}/resolve/main/{filename}"
    fd, tmp = tempfile.mkstemp(prefix=filename + '.', suffix='.part', dir=dest.parent)
    try:
        digest, got = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, 'wb') as f, requests.get(url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                # with a Content-Encoding, Content-Length counts compressed bytes: then skip the size check
                total = None if r.headers.get('Content-Encoding') else int(r.headers.get('Content-Length', 0)) or None
                want = sha256 or stated_sha256(r.headers)
                with tqdm(total=total, unit='B', unit_scale=True, desc=filename) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
        except requests.HTTPError as e:
            raise RuntimeError(f"downloading {url} failed: the server answered {e.response.status_code}") from None
        except requests.RequestException as e:
            raise RuntimeError(f"cannot reach {url} ({type(e).__name__}): offline? Pass a local folder with "
                               f"config.json and model.safetensors instead.") from None
        if total is not None and got != total:
            raise RuntimeError(f"downloading {url}: got {got} bytes, Content-Length said {total}")
        if want is not None and digest.hexdigest() != want.lower():
            raise RuntimeError(f"downloading {url}: sha256 is {digest.hexdigest()}, expected {want}")
        os.replace(tmp, dest)
        sidecar.write_text(digest.hexdigest() + '\n')
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def resolve(path_or_repo, what, cache_dir, base_url, sha256):
    """(config.json, model.safetensors) paths of a local folder, or of a Hugging Face repo downloaded once."""
    folder = Path(path_or_repo).expanduser()
    if folder.is_dir():
        config_path, weights_path = folder / 'config.json', folder / 'model.safetensors'
        for p in (config_path, weights_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} not found: a {what} folder needs config.json and model.safetensors")
        return config_path, weights_path
    if str(path_or_repo).count('/') == 1 and not str(path_or_repo).startswith(('.', '/', '~')):
        return (hf_download(path_or_repo, 'config.json', cache_dir, base_url),
                hf_download(path_or_repo, 'model.safetensors', cache_dir, base_url, sha256=sha256))
    raise FileNotFoundError(f"{path_or_repo!r} is neither a folder nor a Hugging Face repo id (owner/name)")


def load_dinov2(path_or_repo, res=224, cache_dir='~/.cache/beyond-llms', base_url=None, sha256=None):
    """A frozen Dinov2Encoder (eval mode, requires_grad False) from a local folder holding config.json and
    model.safetensors, or from a Hugging Face repo id such as 'facebook/dinov2-small' (downloaded into
    cache_dir once; base_url overrides https://huggingface.co; sha256 checks model.safetensors)."""
    config_path, weights_path = resolve(path_or_repo, 'DINOv2', cache_dir, base_url, sha256)
    cfg = json.loads(Path(config_path).read_text())
    if cfg.get('use_swiglu_ffn', False):
        raise ValueError(f"{config_path}: SwiGLU DINOv2 (giant) is not supported")
    if cfg.get('hidden_act', 'gelu') != 'gelu':
        raise ValueError(f"{config_path}: hidden_act {cfg['hidden_act']!r} is not supported (only exact 'gelu')")
    model = Dinov2Encoder(
        hidden_size=cfg['hidden_size'], num_hidden_layers=cfg['num_hidden_layers'],
        num_attention_heads=cfg['num_attention_heads'], mlp_ratio=cfg.get('mlp_ratio', 4),
        patch_size=cfg.get('patch_size', 14), image_size=cfg.get('image_size', 518),
        layer_norm_eps=cfg.get('layer_norm_eps', 1e-6), qkv_bias=cfg.get('qkv_bias', True),
        num_register_tokens=cfg.get('num_register_tokens', 0),
        # HF's with-registers model interpolates position embeddings with antialias; plain Dinov2Model without
        pos_antialias=cfg.get('model_type') == 'dinov2_with_registers', res=res)
    state = read_safetensors(weights_path)
    check_state_dict(model, state, ignore=Dinov2Encoder.LATENT_BUFFERS)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)   # strict check done above
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# SigLIP 2 vision tower (the paper's encoder, docs/paper.md §6). Fixed-resolution SigLIP 2 checkpoints such as
# google/siglip2-so400m-patch14-224 use HF's `SiglipModel` layout; parameter names below follow its
# `vision_model.*` keys, so only the text tower and the pooling head (which RAE does not use) are dropped.

SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, layer_norm_eps=1e-6)


class SiglipEmbeddings(nn.Module):

    def __init__(self, d, patch, image_size):
        super().__init__()
        self.grid = image_size // patch
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Embedding(self.grid ** 2, d)

    def forward(self, x):
        x = self.patch_embedding(x)                          # [B, d, h, w]
        h, w = x.shape[-2:]
        pos = self.position_embedding.weight
        if (h, w) != (self.grid, self.grid):   # other input sizes: bicubic resize of the stored grid, as HF
            pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(h, w), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
            pos = pos.reshape(h * w, -1)
        return x.flatten(2).transpose(1, 2) + pos


class SiglipAttention(nn.Module):

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.n_head, D // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class SiglipMLP(nn.Module):

    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))   # SigLIP's gelu_pytorch_tanh


class SiglipLayer(nn.Module):

    def __init__(self, d, n_head, hidden, eps):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.self_attn = SiglipAttention(d, n_head)
        self.mlp = SiglipMLP(d, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipTower(nn.Module):

    def __init__(self, d, n_layer, n_head, hidden, patch, image_size, eps):
        super().__init__()
        self.embeddings = SiglipEmbeddings(d, patch, image_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipLayer(d, n_head, hidden, eps) for _ in range(n_layer))
        self.post_layernorm = nn.LayerNorm(d, eps=eps)


class SiglipEncoder(LatentNorm):
    """Frozen SigLIP (2) vision tower as an RAE encoder: images [B, 3, H, W] in [0, 1] -> latents [B, N, d].
    Pixels are scaled to [-1, 1] (SigLIP's mean = std = 0.5), resized to `res`; every output token is a patch
    (SigLIP has no CLS token). As for DINOv2, the final LayerNorm is applied without its affine, then each
    channel is standardised with fit()'s statistics."""

    name = 'siglip2'
    LATENT_BUFFERS = ('mean', 'std')

    def __init__(self, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=16, layer_norm_eps=1e-6, res=224):
        super().__init__(hidden_size)
        if res % patch_size:
            raise ValueError(f"encoder resolution {res} is not a multiple of the patch size {patch_size}")
        self.res, self.eps = res, layer_norm_eps
        self.n_tokens, self.d_latent = (res // patch_size) ** 2, hidden_size
        self.vision_model = SiglipTower(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
                                        patch_size, image_size, layer_norm_eps)

    def trunk(self, pixel_values):
        """[-1, 1] pixels -> hidden states before the final LayerNorm [B, N, d]."""
        x = self.vision_model.embeddings(pixel_values)
        for layer in self.vision_model.encoder.layers:
            x = layer(x)
        return x

    def forward(self, pixel_values):
        """HF's `last_hidden_state` (final LayerNorm with its affine); used to check against references."""
        return self.vision_model.post_layernorm(self.trunk(pixel_values))

    def raw_latents(self, images):
        h = self.trunk(resize(images, self.res) * 2 - 1)
        return F.layer_norm(h, (h.shape[-1],), eps=self.eps)


def load_siglip2(path_or_repo, res=224, grid=None, cache_dir='~/.cache/beyond-llms', base_url=None, sha256=None):
    """A frozen SiglipEncoder from a folder or a Hugging Face repo id (e.g. 'google/siglip2-base-patch16-224'),
    a full SigLIP model (vision + text) or a vision-only one: the vision tower's weights are taken. grid: read
    pictures at grid x patch pixels (grid^2 tokens) instead of res."""
    config_path, weights_path = resolve(path_or_repo, 'SigLIP 2', cache_dir, base_url, sha256)
    cfg = json.loads(Path(config_path).read_text())
    vc = {**SIGLIP_DEFAULTS, **cfg.get('vision_config', cfg)}
    if vc.get('hidden_act', 'gelu_pytorch_tanh') != 'gelu_pytorch_tanh':
        raise ValueError(f"{config_path}: hidden_act {vc['hidden_act']!r} is not supported")
    model = SiglipEncoder(**{k: vc[k] for k in SIGLIP_DEFAULTS}, res=grid * vc['patch_size'] if grid else res)
    state = {k: v for k, v in read_safetensors(weights_path).items()
             if k.startswith('vision_model.') and not k.startswith('vision_model.head.')}
    check_state_dict(model, state, ignore=SiglipEncoder.LATENT_BUFFERS)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.eval().requires_grad_(False)
