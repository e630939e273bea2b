# AST-Boosted: the second command of the paper's README (thu-ml/Adaptive-Sparse-Trainer, "To reproduce our
# methods run"), as a config file: annealed SR-STE, SLoRB k=16 (mean init, trainable projection), distillation from
# the dense teacher (CE 0.33 + KL 0.67), gradient checkpointing.
#   torchrun --nproc_per_node=2 main.py --config ast_boosted
srste_decay = 1e-4
learning_rate = 2e-4
min_lr = 2e-5
teacher_model = "gpt2"
student_model = "gpt2"
warmup_iters = 2000
lr_decay_iters = 38000
increase_step = 10000
max_iters = 40000
batch_size = 8
global_batch_size = 128
mask_metric = "magnitude"
mode = "sparse_forward"
change_mask = True
mask_type = "structured"
SLoRB = True
SLoRB_init_type = "mean"
SLoRB_k = 16
trainable_projection = True
distill_model = True
hardness_task = 0.33
hardness_kldiv = 0.67
hardness_squarehead = 0.0
gradient_checkpointing = True
