# The paper's MoE (docs/paper.md §6): G = 16, 256 experts of width 512 per layer, of which 2 are the per-modality
# shared experts (254 routed), 16 active (1 shared + 15 routed): 13.5B total, 1.5B active.
exec(open('config/paper_modality.py').read())
out_dir = 'out-paper-moe256'
ffn = 'moe'
moe_experts = 254
moe_top_k = 16
moe_d_expert = 512
moe_shared = 'modality'
# the same tokens a step as the dense config, in micro-batches of 2 rows: 16 active experts keep ~3x the dense
# model's activations, and 4 rows a GPU would not fit 8 x 80 GB (python train.py config/paper_moe256.py --meta=True)
batch_size = 2
grad_accum = 2
