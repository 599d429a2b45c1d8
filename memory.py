"""
What a run needs per GPU, known before launch (`python train.py config/paper_modality.py --meta=True`), and the
check that refuses a launch that cannot fit (train.py, on CUDA).

    need = plan(model, cfg, n_gpus, text_share)   # bytes per GPU, by part; model built on the meta device

The parts, per GPU:
    parameters   fp32 master weights: all of them, or 1/n_gpus under FSDP
    gradients    fp32, the same split
    optimizer    AdamW's two fp32 moments (8 bytes a parameter), the same split; Muon keeps one momentum for
                 the blocks' matrices (Muon runs without FSDP)
    working      bf16 copies the step computes with: under FSDP the unsharded weights of the root (embeddings,
                 LM head, adapters) and of two blocks at a time (one computing, the next being gathered); without
                 FSDP under autocast, the bf16 casts of every weight, which autocast keeps for the backward
    activations  what the forward saves for the backward, per token and layer (the residual stream in fp32;
                 the normed inputs of the linear layers, q, k, v and the attention output, the FFN's hidden
                 activations in the compute dtype; flash attention keeps no T x T scores), for batch_size x
                 block_size tokens, plus the LM head's logits on the text positions (bf16 logits, their fp32
                 copy and its gradient)
It is an estimate: allocator fragmentation, NCCL buffers and the CUDA context (~1-3 GB) are not in it, and a
launch is refused only when the estimate alone exceeds the GPU. A test checks the activation term against the
bytes a small model actually saves for its backward.
"""

GB = 1e9


def block_params(block):
    return sum(p.numel() for p in block.parameters())


def activation_bytes_per_token(cfg, e):
    """Bytes one token saves for the backward in one block; e: the compute dtype's size (2 for bf16)."""
    d, kv = cfg.d_model, cfg.n_kv_head * (cfg.d_model // cfg.n_head)
    stream = 2 * d * 4                                    # the two RMSNorms' fp32 inputs
    normed = 2 * d * e                                    # inputs of the attention and FFN linears
    attn = (3 * d + 3 * kv + d) * e                       # q, k before and after RoPE, v, the output, wo's input
    if cfg.qk_norm:
        attn += (d + kv) * e                              # q and k before their norms
    if cfg.ffn == 'moe':
        k, f = cfg.moe_top_k, cfg.moe_d_expert or cfg.d_ff // cfg.moe_top_k
        ffn = k * (d + 5 * f) * e + 2 * cfg.moe_experts * 4   # per expert: its row, gate, SiLU, up, product,
    else:                                                 # gated; fp32 router logits and probabilities
        ffn = 4 * cfg.d_ff * e + (2 * d * e if cfg.ffn == 'modality' else 0)  # gate, SiLU, up, product; the
    return stream + normed + attn + ffn                   # modality sort's rows in and out
def plan(model, cfg, n_gpus, text_share):
    """{part: bytes per GPU} and 'total', for a train.py config dict cfg run on n_gpus GPUs (CUDA: bf16 unless
    dtype=float32); model: the Transfusion it builds (the meta device is enough)."""
    c = model.cfg
    n = sum(p.numel() for p in model.parameters())
    shard = n_gpus if cfg['fsdp'] and n_gpus > 1 else 1
    e = 4 if cfg['dtype'] == 'float32' else 2
    if cfg['optimizer'] == 'muon':
        matrices = sum(p.numel() for name, p in model.named_parameters() if name.startswith('blocks.') and p.dim() >= 2)
        optimizer = 4 * matrices + 8 * (n - matrices)
    else:
        optimizer = 8 * n / shard
    if shard > 1:
        root = n - sum(block_params(b) for b in model.blocks)
        working = 2 * (root + 2 * max(block_params(b) for b in model.blocks)) if e == 2 else 0
    else:
        working = 2 * n if e == 2 else 0
    tokens = cfg['batch_size'] * cfg['block_size']
    activations = (tokens * c.n_layer * activation_bytes_per_token(c, e)
                   + tokens * text_share * c.vocab_size * (e + 4 + 4))
    need = {'parameters': 4 * n / shard, 'gradients': 4 * n / shard, 'optimizer': optimizer, 'working': working,
            'activations': activations}
    need['total'] = sum(need.values())
    return need


def report(need, n_gpus, gpu_gb):
    """One line per part in GB, and whether the total fits a GPU of gpu_gb."""
    parts = ', '.join(f"{k} {v / GB:.1f}" for k, v in need.items() if k != 'total')
    verdict = (f"fits {n_gpus} x {gpu_gb:g} GB" if need['total'] <= gpu_gb * GB else
               f"does NOT fit {n_gpus} x {gpu_gb:g} GB (short by {(need['total'] - gpu_gb * GB) / GB:.1f} GB a GPU)")
    return f"per GPU on {n_gpus} GPUs: {need['total'] / GB:.1f} GB ({parts}): {verdict}"
