"""
The small ViT that the vit encoder, its MAE pretraining head and every RAE pixel decoder are made of
(rae.py, rae_train.py): pictures as non-overlapping patches, learned positions, pre-LN blocks with full
attention (a picture is seen whole), a final LayerNorm and an optional linear head.

    x = patchify(images, 8)       # [B, 3, 32, 32] -> [B, 16, 192]
    h = ViT(192, 64, 6, 4, 16)(x) # -> [B, 16, 64]
    images = unpatchify(y, 8)     # [B, 16, 192] -> [B, 3, 32, 32]
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def patchify(images, patch):
    """[B, 3, H, W] -> [B, (H/p)*(W/p), p*p*3], patches row-major, each patch (p, p, rgb) flattened."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(x, patch, channels=3):
    """Inverse of patchify for a square grid."""
    B, N, _ = x.shape
    g = int(round(N ** 0.5))
    x = x.reshape(B, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, g * patch, g * patch)


class Block(nn.Module):
    """Pre-LN transformer block with full (bidirectional) attention."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Linear in, learned position embeddings, blocks, final LayerNorm, optional linear out. `pos` [B, n] says
    which positions the n given tokens sit at (MAE feeds the encoder only the visible ones)."""

    def __init__(self, d_in, d, n_layer, n_head, n_pos, d_out=0, affine=True):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.pos = nn.Parameter(torch.randn(n_pos, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.out = nn.Linear(d, d_out) if d_out else nn.Identity()

    def forward(self, x, pos=None):
        h = self.inp(x) + (self.pos if pos is None else self.pos[pos])
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))
