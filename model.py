"""
The interleaved decoder: one Llama-style transformer over text tokens and continuous visual latents
(Transfusion recipe, docs/paper.md §1-§5).

    text token  -> token embedding
    latent slot -> linear in-projection of z_t  + learned slot position  + timestep embedding of its block's t
    all tokens  -> N x [RMSNorm -> attention (hybrid mask, RoPE, GQA) -> RMSNorm -> FFN (dense | per modality)]
    text        -> LM head -> next-token cross-entropy
    latent      -> linear out-projection -> v_pred (or x0_pred) -> flow-matching MSE (flow.py)
    L = L_LM + flow_weight * L_flow,  flow_weight = 3 (docs/paper.md §5)

The hybrid mask, as one rule on two per-token ids (docs/design.md "Mask as data"):
    query q may see key k  iff  doc[q] == doc[k]  and  (k <= q  or  (block[q] == block[k] >= 0))
Text is causal; the latents of one image (or video frame) see each other both ways; images are causal in
order; nothing crosses a document boundary. The same rule drives the SDPA boolean mask and flex's mask_mod.

Time conditioning: a timestep embedding is added to the latent tokens only (as Transfusion does), never to
text, so with one t per block no noise level leaks onto shared text. Context images carry t = 1 (clean).
"""

import math
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as flex

import flow
from configurator import seed_of
from moe import MoE

# -----------------------------------------------------------------------------
# the hybrid mask


def dense_mask(doc, block):
    """doc, block: (B, T) -> bool (B, 1, T, T), True where attention is allowed."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    same_doc = doc[:, :, None] == doc[:, None, :]
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    return (same_doc & (causal | same_block))[:, None]


def flex_block_mask(doc, block):
    """The same rule as a flex_attention BlockMask (fully masked tiles are skipped by the kernel)."""

    def mask_mod(b, h, q, k):
        same_block = (block[b, q] == block[b, k]) & (block[b, q] >= 0)
        return (doc[b, q] == doc[b, k]) & ((k <= q) | same_block)

    B, T = doc.shape
    return create_block_mask(mask_mod, B, None, T, T, device=doc.device)


_compiled_flex = None


def flex_attention(q, k, v, block_mask):
    """flex_attention, compiled on CUDA (its fast path: inside a compiled block it is part of the block's
    graph, elsewhere compiled on its own); eager on CPU (forward only there)."""
    global _compiled_flex
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex(q, k, v, block_mask=block_mask, enable_gqa=True)


# -----------------------------------------------------------------------------
# layers


def rope_tables(head_dim, max_pos, base):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)  # (max_pos, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); cos/sin (B, 1, T, hd/2): rotate the two halves of each head as complex pairs, in x's
    dtype (fp32 tables would promote bf16 queries and keys to fp32, and the attention kernel with them)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)
        # QK-norm bounds the attention logits: a query's scale can no longer make a head sharp by growing
        self.qk_norm, self.eps = cfg.qk_norm, cfg.norm_eps
        if cfg.qk_norm:
            self.q_gain = nn.Parameter(torch.ones(self.head_dim))
            self.k_gain = nn.Parameter(torch.ones(self.head_dim))

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:  # the gain in q's dtype: bf16 input with an fp32 weight misses the fused kernel
            q = F.rms_norm(q, (self.head_dim,), self.q_gain.to(q.dtype), self.eps)
            k = F.rms_norm(k, (self.head_dim,), self.k_gain.to(k.dtype), self.eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)   # (B, H, T, hd), (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, T_cached + T, hd)
        if isinstance(mask, torch.Tensor) or mask is None:  # None: a cached step, every key visible (KVCache)
            # bf16 autocast on CPU: the CPU flash kernel's bf16 backward is slower than its fp32 one
            # (docs/speed.md), so attention stays fp32 while the matmuls run bf16
            fp32 = q.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
            with torch.autocast('cpu', enabled=False) if fp32 else nullcontext():
                if fp32:
                    q, k, v = q.float(), k.float(), v.float()
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            y = flex_attention(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModalityFFN(nn.Module):
    """A text FFN and a vision FFN; each token goes through its own modality's (docs/paper.md §1: 2.3B total,
    1.5B active). The tokens are sorted by modality once per forward (Route) and each FFN runs on its slice:
    'grouped' is one torch._grouped_mm per weight with the slice offsets as a tensor, so nothing waits on the
    host and no shape depends on the data (CUDA, and whenever compiled); otherwise each FFN runs on its slice,
    cut at the count the host knows (CPU eager, where the grouped kernel is no faster). Both compute the same
    thing (a test compares them)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.text = SwiGLU(d_model, d_ff)
        self.vision = SwiGLU(d_model, d_ff)

    def weights(self):
        """The two FFNs' weights stacked as expert banks for the grouped kernel: w1, w3 [2, D, F] and w2 [2, F, D]
        (a copy each call; the two nn.Linear modules stay the parameters, so checkpoints and optimizers see no
        change)."""
        return [torch.stack([getattr(self.text, w).weight, getattr(self.vision, w).weight]).transpose(1, 2)
                for w in ('w1', 'w3', 'w2')]

    def forward(self, x, route):
        x_SD = x.flatten(0, 1)[route.order]
        if route.grouped:
            y_SD = MoE._swiglu_grouped(x_SD, route.counts, *self.weights(), None)
        else:
            n_text = route.host_counts[0]
            y_SD = torch.cat([self.text(x_SD[:n_text]), self.vision(x_SD[n_text:])])
        return y_SD.new_empty(y_SD.shape).index_copy_(0, route.order, y_SD).view(*x.shape[:2], -1)


@dataclass
class Route:
    """Every position of a (B, T) sequence sorted by modality (text first), computed once per forward and
    shared by every layer's ModalityFFN: `order` [B*T], `counts` [2] (a device tensor) and the same counts
    on the host (from the shapes: no sync), and which path the FFNs take."""
    order: torch.Tensor
    counts: torch.Tensor
    host_counts: list
    grouped: bool

    @staticmethod
    def of(modality, n_latent_slots, grouped):
        B, T = modality.shape
        n_vis = (modality == 1).sum()
        return Route(torch.argsort(modality.flatten(), stable=True), torch.stack([B * T - n_vis, n_vis]),
                     [B * T - n_latent_slots, n_latent_slots], grouped)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.ffn == 'dense':
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)
        elif cfg.ffn == 'modality':
            self.ffn = ModalityFFN(cfg.d_model, cfg.d_ff)
        else:
            self.ffn = MoE(cfg.d_model, cfg.moe_d_expert or cfg.d_ff // cfg.moe_top_k, cfg.moe_experts,
                           cfg.moe_top_k, cfg.moe_shared, cfg.moe_dispatch, cfg.moe_balance, cfg.moe_z)

    def forward(self, x, cos, sin, mask, modality, route, cache=None, layer=0):
        """-> (x, aux): aux is the MoE's losses and routing counts, None for the other FFNs."""
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache, layer)
        h = self.norm2(x)
        if isinstance(self.ffn, SwiGLU):
            return x + self.ffn(h), None
        if isinstance(self.ffn, ModalityFFN):
            return x + self.ffn(h, route), None
        y, aux = self.ffn(h, modality)
        return x + y, aux


def row_offset(p):
    """Where a parameter's local rows start in the whole: 0, or an FSDP2 shard's first row (Shard(0) splits
    dim 0 as torch.chunk does)."""
    if not hasattr(p, 'to_local'):
        return 0
    n, world = p.shape[0], p.device_mesh.size()
    return min(p.device_mesh.get_local_rank() * -(-n // world), n)


def fill_rows(local, start, std, seed):
    """local[i] = row start + i of a normal(0, std) parameter whose rows come in blocks of R, block k drawn
    (on the CPU) from a generator seeded seed_of(seed, k).

    Only the head of a block that the rows need is drawn: torch's CPU normal fills 16 values at a time from
    16 uniforms in order, so the first 16·j values of a draw are the same whatever its length (its last 16
    are redrawn when the length is not a multiple of 16, hence the margin). A small parameter then costs its
    own size, not a 4M-value block (a test compares this with drawing whole blocks)."""
    row = local[0].numel() if len(local) else 1
    R = max(1, (1 << 22) // row)
    for k in range(start // R, -(-(start + len(local)) // R)):
        lo, hi = max(k * R, start), min((k + 1) * R, start + len(local))
        n, need = R * row, -(-(hi - k * R) * row // 16) * 16
        gen = torch.Generator().manual_seed(seed_of(seed, k))
        block = torch.randn(n if need > n - 32 else need, generator=gen)[:(hi - k * R) * row] * std
        local[lo - start:hi - start] = block.view(-1, *local.shape[1:])[lo - k * R:].to(local.device, local.dtype)


def timestep_embedding(t, dim):
    """Sinusoidal features of t in [0, 1] (scaled by 1000 as diffusion models do): (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = 1000 * t.float()[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class KVCache:
    """Keys and values of a prefix, per layer, for sampling one document.

    A step on a non-empty cache runs either one text token or one whole visual block, so every new query
    may see every key (the mask rule within one document) and no mask is needed. With store=False the
    step reads the cache without growing it: the Euler steps of an image re-run the same latent slots
    against a fixed prefix."""

    def __init__(self, n_layer):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.store = True

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        if self.store:
            self.k[layer], self.v[layer] = k, v
        return k, v


# -----------------------------------------------------------------------------
# the model


@dataclass
class ModelConfig:
    """The network. Its defaults are the CPU default run's; every field but the four shapes below is a knob of
    train.py (KNOBS), and a checkpoint stores the whole config."""
    vocab_size: int = 532      # shape: the tokenizer's (+ padding: data.py's vocab_size knob)
    block_size: int = 256      # shape: longest sequence (RoPE table size) = data.py's block_size
    d_latent: int = 64         # shape: the encoder's latent dim
    n_latent: int = 16         # shape: latent tokens per visual block
    d_model: int = 256         # width (the paper: 2048)
    n_layer: int = 6           # transformer blocks (the paper: 16)
    n_head: int = 8            # query heads
    n_kv_head: int = 4         # key/value heads; < n_head: grouped-query attention
    d_ff: int = 768            # SwiGLU hidden size (the paper: 4 x d_model = 8192)
    ffn: str = 'modality'      # dense | modality (a text and a vision FFN, the paper's) | moe
    moe_experts: int = 16      # moe: routed experts E
    moe_top_k: int = 4         # moe: active experts per token, the shared one included
    moe_d_expert: int = 0      # moe: expert hidden size; 0 = d_ff / moe_top_k (active FFN compute = dense)
    moe_shared: str = 'modality'  # moe: shared experts none | global | modality (docs/paper.md §6, Table 2)
    moe_balance: float = 0.01  # moe: Switch load-balancing loss coefficient
    moe_z: float = 1e-3        # moe: router z-loss coefficient
    moe_dispatch: str = 'auto'  # moe: auto | grouped | loop
    flow_target: str = 'v'     # v | x: what the network predicts (docs/paper.md §4)
    flow_weight: float = 3.0   # lambda in L = L_LM + lambda * L_flow (docs/paper.md §5)
    shift: float = 3.0         # noise shift alpha; 0 = the RAE formula sqrt(N*d/4096) (docs/design.md)
    rope_base: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5     # RMSNorm epsilon
    qk_norm: bool = True       # RMSNorm (with a gain) on each head's queries and keys before RoPE (speedruns)
    ctx_noise: float = 0.0     # clips: context frames noised in training to u ~ U(0, ctx_noise), fed with t = 1 - u
    rollout_noise: float = 0.0  # rollouts: each generated frame fed back noised to u = rollout_noise (t = 1 - u)
    action_cfg: float = 1.0    # rollouts: guidance scale on each frame's action (> 1 needs action_drop in training)
    attn: str = 'auto'         # auto (flex to train on CUDA, SDPA elsewhere) | sdpa | flex

    def __post_init__(self):
        sizes = ('vocab_size', 'block_size', 'd_latent', 'n_latent', 'd_model', 'n_layer', 'n_head', 'n_kv_head', 'd_ff',
                 'moe_experts', 'moe_top_k')
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        routed = self.moe_top_k - (self.moe_shared != 'none')
        checks = [
            (self.ffn in ('dense', 'modality', 'moe'), f"ffn must be dense, modality or moe, got {self.ffn!r}"),
            (self.moe_shared in ('none', 'global', 'modality'),
             f"moe_shared must be none, global or modality, got {self.moe_shared!r}"),
            (self.moe_dispatch in ('auto', 'grouped', 'loop'),
             f"moe_dispatch must be auto, grouped or loop, got {self.moe_dispatch!r}"),
            (self.ffn != 'moe' or 1 <= routed <= self.moe_experts,
             f"moe_top_k={self.moe_top_k} with moe_shared={self.moe_shared!r} leaves {routed} routed experts "
             f"of moe_experts={self.moe_experts}"),
            (self.moe_d_expert >= 0 and self.shift >= 0 and self.flow_weight >= 0,
             "moe_d_expert, shift and flow_weight must not be negative"),
            (self.action_cfg >= 0, f"action_cfg must not be negative, got {self.action_cfg}"),
            (0 <= self.ctx_noise < 1 and 0 <= self.rollout_noise < 1,
             f"ctx_noise and rollout_noise are noise levels in [0, 1), got {self.ctx_noise}, {self.rollout_noise}"),
            (self.flow_target in ('v', 'x'), f"flow_target must be 'v' or 'x', got {self.flow_target!r}"),
            (self.attn in ('auto', 'sdpa', 'flex'), f"attn must be auto, sdpa or flex, got {self.attn!r}"),
            (self.d_model % self.n_head == 0, f"d_model {self.d_model} is not divisible by n_head {self.n_head}"),
            (self.n_head % self.n_kv_head == 0, f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}"),
            ((self.d_model // self.n_head) % 2 == 0, "the head dim must be even for RoPE"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def alpha(self):
        return self.shift if self.shift > 0 else flow.shift_alpha(self.n_latent, self.d_latent)


@dataclass
class Inputs:
    """What the network reads at each position of a (B, T) sequence: a packed training batch (data.Batch plus
    its noised latents) or a document being generated (generate.Doc)."""
    tokens: torch.Tensor    # (B, T) long: text ids; <IMG> at latent slots
    modality: torch.Tensor  # (B, T) long: 0 text, 1 latent
    block: torch.Tensor     # (B, T) long: visual block id within the row, -1 for text
    doc: torch.Tensor       # (B, T) long: document id within the row, -1 for padding
    pos: torch.Tensor       # (B, T) long: position within the document (RoPE)
    lat_idx: torch.Tensor   # (L,) long: the latent slots, as flat indices b * T + j, row-major
    z: torch.Tensor         # (L, d_latent): their inputs, noised or clean
    t: torch.Tensor         # (L,): their times (1 = clean)


SHAPES = ('vocab_size', 'block_size', 'd_latent', 'n_latent')  # set from the data and the encoder, not knobs
KNOBS = {f.name: f.default for f in fields(ModelConfig) if f.name not in SHAPES}


def latent_times(batch, n_latent, alpha, t_fixed=None, ctx_noise=0.0):
    """t of every latent slot (L,): one draw per visual block (each picture or video frame has its own t,
    Diffusion Forcing), shared by its n_latent slots, or t_fixed for all; context blocks are clean (t = 1).
    With ctx_noise > 0 the context frames of clips (batch.lat_clip) are noised to t = 1 - u, u ~ U(0, ctx_noise)
    per frame, drawn after the targets' times (which stay as they were): the model learns to read past the
    errors of frames it generated itself (GameNGen's noise augmentation); the pictures of image->text documents
    stay clean. The number of blocks comes from the shapes, so nothing waits on the device."""
    n_blocks = batch.lat_idx.shape[0] // n_latent
    t_block = flow.sample_t((n_blocks,), alpha, device=batch.latents.device)
    if t_fixed is not None:
        t_block = torch.full_like(t_block, t_fixed)
    t = torch.where(batch.lat_target, t_block.repeat_interleave(n_latent), 1.0)
    if ctx_noise > 0:
        u = ctx_noise * torch.rand(n_blocks, device=batch.latents.device)
        t = torch.where(batch.lat_clip, 1 - u.repeat_interleave(n_latent), t)
    return t


class Transfusion(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.lat_in = nn.Linear(cfg.d_latent, d)
        self.lat_pos = nn.Parameter(torch.zeros(cfg.n_latent, d))  # where a latent sits inside its image
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)  # untied (docs/paper.md §1)
        self.lat_out = nn.Linear(d, cfg.d_latent)
        cos, sin = rope_tables(d // cfg.n_head, cfg.block_size, cfg.rope_base)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.compiled = False  # compile_blocks() was called: the FFNs take the grouped path
        if self.lm_head.weight.device.type != 'meta':  # on the meta device there is nothing to fill yet
            self.init_weights(torch.initial_seed())

    def init_std(self, name, p):
        """Each parameter's initialisation: GPT-2's normal(0, 0.02), the residual projections scaled by depth,
        the latent head at zero (it starts by predicting zero velocity, DiT's zero-init), biases at 0, norm
        gains at 1. None means ones."""
        if name.startswith('lat_out.') or name.endswith('.bias'):
            return 0.0
        if p.dim() == 1:
            return None
        if name.endswith(('wo.weight', 'w2.weight', '.w2', '.s_w2')):
            return 0.02 / math.sqrt(2 * self.cfg.n_layer)
        return 0.02

    @torch.no_grad()
    def init_weights(self, seed):
        """Fill every parameter from `seed` alone, whatever the device or sharding: rows of parameter `name`
        come in fixed blocks, block k drawn from its own generator seed_of(seed, crc32(name), k), so an FSDP
        shard fills exactly the rows the whole model would have (parallel.py) and the order in which modules
        were built does not matter. Also recomputes the RoPE tables (buffers left empty by the meta device)."""
        for name, p in self.named_parameters():
            local, std = p.to_local() if hasattr(p, 'to_local') else p, self.init_std(name, p)
            if std is None:
                local.fill_(1.0)
            elif std == 0:
                local.zero_()
            else:
                fill_rows(local, row_offset(p), std, seed_of(seed, zlib.crc32(name.encode())))
        cos, sin = rope_tables(self.cfg.d_model // self.cfg.n_head, self.cfg.block_size, self.cfg.rope_base)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        return self

    def count_params(self):
        """Total, and active per token: a token runs one of the two modality FFNs (docs/paper.md §1), or its
        shared expert and k routed experts of the MoE. 'paper_active' leaves out the MoE routers (33M at 1008
        experts) and the latent adapters and timestep MLP (10M at d_model 2048): docs/paper.md §1 derives the
        paper's 1.5B from embeddings + attention + one FFN per layer, for the dense and MoE models alike."""
        total = sum(p.numel() for p in self.parameters())
        idle = routers = 0
        for b in self.blocks:
            if isinstance(b.ffn, ModalityFFN):
                idle += sum(p.numel() for p in b.ffn.vision.parameters())
            elif isinstance(b.ffn, MoE):
                moe_total, moe_active = b.ffn.count_params()
                idle += moe_total - moe_active
                routers += b.ffn.router.weight.numel()
        adapters = sum(p.numel() for m in (self.lat_in, self.t_mlp, self.lat_out) for p in m.parameters())
        adapters += self.lat_pos.numel()
        return {'total': total, 'active': total - idle, 'paper_active': total - idle - routers - adapters}

    def flops_per_token(self):
        """The 6N convention (nanoGPT's; scaling.py budgets with it): 6 FLOPs per active parameter and token,
        plus 12 n_layer d_model block_size for attention over a whole window. It counts work that never runs
        (the embedding gather, the LM head on every token, attention the mask excludes): train_flops counts
        what executes."""
        c = self.cfg
        return 6 * self.count_params()['active'] + 12 * c.n_layer * c.d_model * c.block_size

    def train_flops(self, batch, tile=0):
        """FLOPs of one training step (forward and backward) on a Batch, two ways, each named:
            'executed': the matmuls that run, 2 FLOPs a multiply-add, backward twice the forward (once for the
                first layers of the latent adapters, whose inputs need no gradient): per layer the attention
                projections and one FFN (or the router and top_k experts) on every position (padding is
                computed too); the latent in/out projections and the timestep MLP on latent slots; the LM
                head on text targets only; attention scores and values over the (query, key) pairs the kernel
                computes, with the backward's recomputation of the scores (3.5x the forward, as flash kernels
                run it): every pair for SDPA's dense mask (tile=0), or every pair of each tile x tile tile
                the mask does not wholly exclude (flex_attention skips those: tile=128 on CUDA).
            '6N': flops_per_token() for every position."""
        c = self.cfg
        B, T = batch.tokens.shape
        d, hd = c.d_model, c.d_model // c.n_head
        attn = d * (2 * d + 2 * c.n_kv_head * hd)                                        # wq, wo, wk, wv
        ffn = self.blocks[0].ffn.count_params()[1] if c.ffn == 'moe' else 3 * d * c.d_ff
        L = batch.lat_idx.shape[0]
        macs = (B * T * c.n_layer * (attn + ffn) + L * (d * d + d * c.d_latent)            # t_mlp[2], lat_out
                + batch.text_idx.shape[0] * d * c.vocab_size)
        first = L * (c.d_latent * d + 256 * d)                                              # lat_in, t_mlp[0]
        if tile:
            allowed = dense_mask(batch.doc, batch.block)[:, 0]
            n = -(-T // tile) * tile
            allowed = F.pad(allowed, (0, n - T, 0, n - T)).view(B, n // tile, tile, n // tile, tile)
            pairs = int(allowed.any(4).any(2).sum()) * tile * tile
        else:
            pairs = B * T * T
        executed = 3 * 2 * macs + 2 * 2 * first + 3.5 * 4 * d * c.n_layer * pairs
        return {'executed': executed, '6N': self.flops_per_token() * B * T}

    def compile_blocks(self):
        """torch.compile each block's forward (as torchtitan does, before FSDP wraps the blocks, whose hooks then
        run outside the graphs): the embeddings, mask and losses stay eager, where shapes change from batch to
        batch; a block sees fixed shapes."""
        for blk in self.blocks:
            blk.forward = torch.compile(blk.forward)
        self.compiled = True
        return self

    def make_mask(self, doc, block, flex_ok):
        # 'auto' = flex on CUDA for full sequences (training, held-out losses; SDPA's boolean mask with GQA
        # falls back to the math kernel there); SDPA for sampling, whose prefix lengths vary (flex recompiles
        # per length), and for head dims < 16 (tiny test models)
        use_flex = self.cfg.attn == 'flex' or (self.cfg.attn == 'auto' and doc.is_cuda and flex_ok
                                               and self.cfg.d_model // self.cfg.n_head >= 16)
        return flex_block_mask(doc, block) if use_flex else dense_mask(doc, block)

    def hidden(self, inp, cache=None, flex_ok=False):
        """Final hidden states (B, T, d) of the Inputs `inp`, and per layer the MoE aux (None for other FFNs).
        Text tokens are embedded; each latent slot gets the in-projection of its z, its slot's position inside
        its picture and its time's embedding (every visual block is n_latent slots long, row-major, so slot =
        index mod n_latent; a cached step passes whole blocks)."""
        B, T = inp.tokens.shape
        x = self.tok_emb(inp.tokens)
        n_lat = inp.lat_idx.shape[0]
        if n_lat:
            slot = torch.arange(n_lat, device=x.device) % self.cfg.n_latent
            x_lat = self.lat_in(inp.z) + self.lat_pos[slot] + self.t_mlp(timestep_embedding(inp.t, 256))
            x = x.flatten(0, 1).index_copy(0, inp.lat_idx, x_lat.to(x.dtype)).view(B, T, -1)
        cos, sin = self.rope_cos[inp.pos].unsqueeze(1), self.rope_sin[inp.pos].unsqueeze(1)   # (B, 1, T, hd/2)
        mask = self.make_mask(inp.doc, inp.block, flex_ok) if cache is None or len(cache) == 0 else None
        route = Route.of(inp.modality, n_lat, x.is_cuda or self.compiled) if self.cfg.ffn == 'modality' else None
        auxes = []
        for i, blk in enumerate(self.blocks):
            x, aux = blk(x, cos, sin, mask, inp.modality, route, cache, i)
            auxes.append(aux)
        return self.norm(x), auxes

    def forward(self, batch, t_fixed=None):
        """The joint training loss on a packed Batch (data.py) whose latents are all encoded. -> (loss, metrics).

        Each target visual block draws its own t (one per image / frame, Diffusion-Forcing style), or every
        target block takes t_fixed (eval on a grid of t); context blocks stay clean (t = 1), no flow loss, except
        the context frames of clips in training with ctx_noise > 0 (latent_times), noised to their t.
        Every selection is by index tensors the batch brings (text_idx, lat_idx) or by weights, never by a
        boolean mask: no shape depends on the device's data, so the step never waits on it."""
        x0 = batch.latents.float()
        # context frames are noised in training only: held-out losses read clean true frames
        ctx_noise = self.cfg.ctx_noise if self.training else 0.0
        t = latent_times(batch, self.cfg.n_latent, self.cfg.alpha, t_fixed, ctx_noise)
        noise = torch.randn_like(x0)
        z = torch.where((t < 1).unsqueeze(-1), flow.add_noise(x0, noise, t), x0)   # targets (and noised context)
        inp = Inputs(batch.tokens, batch.modality, batch.block, batch.doc, batch.pos, batch.lat_idx, z, t)
        h, auxes = self.hidden(inp, flex_ok=True)
        h = h.flatten(0, 1)

        logits = self.lm_head(h[batch.text_idx]).float()   # the LM head runs on text targets only
        lm_loss = F.cross_entropy(logits, batch.targets.flatten()[batch.text_idx]) if len(batch.text_idx) \
            else logits.sum()

        pred = self.lat_out(h[batch.lat_idx]).float()
        per_tok = flow.flow_loss(pred, x0, noise, t, self.cfg.flow_target)
        weight = batch.lat_target.float()                   # context latents carry no flow loss
        flow_loss = (per_tok * weight).sum() / weight.sum().clamp(min=1)

        loss = lm_loss + self.cfg.flow_weight * flow_loss
        metrics = {'lm_loss': lm_loss.detach(), 'flow_loss': flow_loss.detach()}
        if self.cfg.ffn == 'moe':  # balance and z losses of every layer join the objective
            aux_loss = sum(a['balance'] + a['z'] for a in auxes)
            loss = loss + aux_loss
            metrics['aux_loss'] = aux_loss.detach()
            metrics['counts'] = torch.stack([a['counts'] for a in auxes])  # (layers, 2, E)
        return loss, metrics
