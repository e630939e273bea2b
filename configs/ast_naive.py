# AST-Naive as the paper defines it (its table and ablation, METHOD.md section 9): changing 2:4 masks, annealed
# SR-STE and distillation from the dense teacher, no SLoRB. The paper's README has no command for it: this is the
# second command (configs/ast_boosted.py) without SLoRB, the published GPT-2 recipe otherwise.
#   torchrun --nproc_per_node=8 main.py --config ast_naive
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
SLoRB = False
distill_model = True
hardness_task = 0.33
hardness_kldiv = 0.67
hardness_squarehead = 0.0
gradient_checkpointing = True
