# Action-conditioned navigation clips added to the world mixture: the world model of docs/paper.md §7. A clip is
# 5 frames (64 latents each) with 4 actions between them, ~400 tokens, hence rows of 512 (same tokens per step).
# The mixture, steps and encoder are the world run of docs/results.md (4x4 patches; the default since has clips of
# 16-latent frames in its own mixture: docs/speedrun.md).
# python train.py config/world.py && python eval.py --ckpt=out-world/ckpt.pt && python sample.py --ckpt=out-world/ckpt.pt --mode=rollout
out_dir = 'out-world'
mixture = 'text=0.2,caption2image=0.5,image2caption=0.15,qa=0.15,action=0.1'
max_iters = 600
block_size = 512
batch_size = 8
patch_size = 4
decoder_dim = 96
warmup_iters = 50
eval_interval = 100
qk_norm = False
