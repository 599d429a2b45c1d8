"""
Writes testdata/siglip-tiny/: a tiny, randomly initialised SigLIP (vision + text towers) saved by Hugging Face
transformers in its own checkpoint format, and what transformers' vision tower outputs for fixed inputs at
the stored size and at a larger one (interpolated position embeddings). test_rae.py checks
pretrained.load_siglip2 against it: the real code path on a real-format checkpoint, with no download.

    pip install transformers   # only to regenerate this fixture; not a dependency of the project
    python testdata/make_siglip_tiny.py
"""

from pathlib import Path

import numpy as np
import torch
from transformers import SiglipConfig, SiglipModel

out = Path(__file__).resolve().parent / 'siglip-tiny'
torch.manual_seed(0)
cfg = SiglipConfig(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     vocab_size=100, max_position_embeddings=16))
model = SiglipModel(cfg).eval()
with torch.no_grad():   # LayerNorms start at 1/0 and biases at 0: perturb everything so each weight matters
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
model.save_pretrained(out)
x32, x48 = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1   # SigLIP's [-1, 1] pixels
with torch.no_grad():
    ref32 = model.vision_model(pixel_values=x32).last_hidden_state
    ref48 = model.vision_model(pixel_values=x48, interpolate_pos_encoding=True).last_hidden_state
np.savez(out / 'reference.npz', x32=x32.numpy(), ref32=ref32.numpy(), x48=x48.numpy(), ref48=ref48.numpy())
print(f"wrote {out}")
