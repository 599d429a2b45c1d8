# The CPU default, written out: `python train.py` with no arguments runs exactly this (train.py's defaults).
# Copy this file to start your own config; every key here is a train.py global. How it was chosen:
# docs/speedrun.md.
out_dir = 'out'
tokenizer = 'world'        # a BPE learnt from the world's own text (tokenizer.py)
d_model = 256
n_layer = 6
n_head = 8
n_kv_head = 4
d_ff = 768
qk_norm = True             # docs/speedrun.md: the lever that brought binding
ffn = 'modality'
block_size = 256
batch_size = 8
mixture = 'text=0.1,caption2image=0.35,image2caption=0.1,qa=0.25,action=0.2'   # shares of documents
max_iters = 2200
warmup_iters = 100
eval_interval = 200
learning_rate = 1e-3
shift = 3.0
encoder = 'vit'
patch_size = 8             # 16 latent tokens per 32x32 picture
decoder_dim = 192
n_images = 16384
mae_steps = 1000
decoder_steps = 800
