# The paper's backbone (docs/paper.md §1): d_model 2048 x 16 layers, 32 query / 8 KV heads, SwiGLU 8192, a text and a
# vision FFN per block (2.3B total, 1.5B active), sequence 4096, LLaMA-3 vocabulary size, 256 tokens per image
# (224² / 14² patches; the paper's SigLIP 2 latents are 1152-d, the pixel baseline here is 588-d).
# Count it without allocating: python train.py config/paper_modality.py --meta=True
# Train it (bf16, flex attention, 8 GPUs): torchrun --nproc_per_node=8 train.py config/paper_modality.py
out_dir = 'out-paper'
vocab_size = 128256
d_model = 2048
n_layer = 16
n_head = 32
n_kv_head = 8
d_ff = 8192
ffn = 'modality'
block_size = 4096
batch_size = 4
image_size = 224
patch_size = 14
mixture = 'paper'          # text 50%, image-text 22.5%, video 25%, action clips 2.5% (docs/paper.md §2.5)
encoder = 'pixel'        # 588-d patches stand in for SigLIP 2 when counting (the RAE latent only sizes two linears)
learning_rate = 3e-4
min_lr = 1.5e-5
warmup_iters = 4000
max_iters = 27000
compile = True
fsdp = True                 # under torchrun: FSDP2 from the meta device (parallel.py); one process ignores it
qk_norm = False             # not stated by the paper (docs/paper.md §1): LLaMA-style attention
