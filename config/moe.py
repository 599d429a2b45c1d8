# The default world run with a fine-grained MoE instead of the per-modality FFN (docs/paper.md §6), at equal
# active parameters: 4 active experts of width d_ff/4 = 192 (one shared expert per modality + 3 routed of 16).
out_dir = 'out-moe'
ffn = 'moe'
moe_experts = 16
moe_top_k = 4
moe_shared = 'modality'
