# The CPU default before the speedrun (commit 8c64b3d): 4x4 patches (64 latents a picture), a 96-wide pixel
# decoder, no action clips, no QK-norm, 16 rows x 900 steps. The older results in docs/results.md (3x / 8x tokens, MoE,
# RAE table) were measured with it; combine it with another config to rerun them:
#     python train.py config/patch4.py config/moe.py
patch_size = 4
decoder_dim = 96
mixture = 'text=0.1,caption2image=0.45,image2caption=0.15,qa=0.3'
batch_size = 16
max_iters = 900
warmup_iters = 50
eval_interval = 100
qk_norm = False
