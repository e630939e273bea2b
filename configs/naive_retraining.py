# Naive retraining: the first command of the paper's README (thu-ml/Adaptive-Sparse-Trainer, "To reproduce naive
# retraining run"), as a config file:
#   torchrun --nproc_per_node=8 main.py --config naive_retraining
# The command sets no --change_mask, --srste_decay or --increase_step, so the published defaults apply (and are
# ours): a fixed 2:4 magnitude mask, SR-STE 6e-5 annealed over 10,000 steps (with a fixed mask it only shrinks
# the pruned weights, which the forward never uses), no distillation, 40k steps of 128 x 1024 tokens.
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
