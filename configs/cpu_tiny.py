# A seconds-long CPU run for tests and smoke checks: pass --student_model/--teacher_model (tiny folders),
# --data_dir and --wikitext_dir. Override anything on the command line.
device = "cpu"
block_size = 32
batch_size = 2
global_batch_size = 4
max_iters = 6
warmup_iters = 2
lr_decay_iters = 5
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 3
eval_iters = 2
ppl_windows = 4
log_interval = 1
mask_update_interval = 2
progress = False
num_threads = 1
# The tests exercise mask updates and KL-only distillation (their tiny teachers may differ from the student in
# depth or width); main.py's defaults (the published ones) have neither. The SR-STE ramp fits the short run, and
# SLoRB's k is the paper's AST command's (the published default 64 does not divide the tiny models' widths).
change_mask = True
increase_step = 4
SLoRB_k = 16
hardness_task = 0.33
hardness_kldiv = 0.67
hardness_squarehead = 0.0
