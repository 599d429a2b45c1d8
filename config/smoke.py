# CI smoke run: a tiny model for a few steps; proves the whole loop (data, model, eval, checkpoint, log) works.
out_dir = 'out-smoke'
d_model = 64
n_layer = 2
n_head = 4
n_kv_head = 2
d_ff = 128
batch_size = 4
max_iters = 60
warmup_iters = 5
eval_interval = 30
eval_batches = 1
log_interval = 10
encoder = 'pixel'   # the vit RAE's pretraining takes minutes; its own tests cover it (test_rae.py)
n_images = 2048
block_size = 512    # room for an action clip: the smoke run exercises every document kind
mixture = 'text=0.2,caption2image=0.4,image2caption=0.1,qa=0.1,video=0.1,action=0.1'
video_frames = 4    # a 2-object motion text + 5 frames can pass 512 tokens
