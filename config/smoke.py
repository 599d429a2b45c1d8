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
