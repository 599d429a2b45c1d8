# The paper's sparsest MoE (docs/paper.md §6): 1008 experts of width 512 (2 shared + 1006 routed), 16 active:
# 51.5B total, 1.5B active (plus 33M of router weights every token runs).
exec(open('config/paper_moe256.py').read())
out_dir = 'out-paper-moe1008'
moe_experts = 1006
