# AST-Naive, the first upstream command (README of the paper's code), as a config file:
#   torchrun --nproc_per_node=8 main.py --config ast_naive
# Changing masks every 10 steps, magnitude scores, 2:4, 40k steps of 128 x 1024 tokens.
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 2000
lr_decay_iters = 38000
max_iters = 40000
batch_size = 8
global_batch_size = 128
mode = "sparse_forward"
mask_type = "structured"
mask_metric = "magnitude"
