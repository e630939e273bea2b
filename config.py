"""The training configuration: one typed dataclass is the single source of truth for every main.py flag.

Precedence: defaults < config file (--config configs/NAME.py or .json) < command line.
Flags are `--key value` or `--key=value`; booleans accept True/False/true/false/1/0.
"""
import dataclasses
import json
import os
import runpy
import typing
from dataclasses import dataclass, field

from cli import REPO_ROOT, UserError, did_you_mean, parse_bool
from sources import MODEL_HELP


def opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # --- I/O
    config: str = opt("", "config file (configs/NAME.py or .json, or a bare name in configs/) applied before flags")
    out_dir: str = opt("out", "folder for checkpoints, metrics.jsonl and results.json (one run per folder)")
    overwrite: bool = opt(False, "start a new run in an out_dir that holds another, deleting that run's "
                                 "checkpoints, metrics.jsonl and results.json (without it, main.py refuses)")
    keep_checkpoints: int = opt(2, "training checkpoints kept (ckpt-ITER.pt, each with a .sha256; ckpt.pt is the "
                                   "newest): a damaged newest one falls back to the one before")
    init_from: str = opt("", "'' starts from --student_model; 'resume' continues out_dir/ckpt.pt exactly; "
                             "'scratch' builds a random GPT-2 of --n_layer/--n_head/--n_embd (pretraining); "
                             "or a checkpoint .pt / export folder to start from (a sparse one keeps its masks "
                             "and SLoRB exactly), or any other model --student_model accepts")
    student_model: str = opt("gpt2", "student: " + MODEL_HELP)
    n_layer: int = opt(12, "--init_from scratch only: number of blocks")
    n_head: int = opt(12, "--init_from scratch only: attention heads")
    n_embd: int = opt(768, "--init_from scratch only: width")
    dropout: float = opt(0.0, "--init_from scratch only: dropout")
    teacher_model: str = opt("gpt2", "dense teacher for distillation: any model --student_model accepts with the "
                                     "student's tokenizer (another size works KL-only)")
    data_dir: str = opt("data/c4_dataset", "folder with train.bin and val.bin from data/c4_dataset/prepare.py "
                                           "(made with the student's tokenizer)")
    wikitext_dir: str = opt("data/wikitext", "folder with test.bin from data/wikitext/prepare.py (made with the "
                                             "student's tokenizer); '' = no WikiText-2 perplexity")
    calibration: str = opt("", "Wanda calibration file from prepare_calibration_data.py ('' = windows of train.bin)")
    calib_nsamples: int = opt(128, "calibration windows drawn from train.bin when --calibration is empty")
    seed: int = opt(1337, "seeds the data order, initialisation and every RNG")
    # --- sparsity
    mode: str = opt("sparse_forward", "sparse_forward trains with masks; dense trains the plain model",
                    ("sparse_forward", "dense"))
    mask_type: str = opt("structured", "structured = N:M; unstructured = --sparsity per output row (as "
                                       "published); unstructured_layer = --sparsity per layer",
                         ("structured", "unstructured", "unstructured_layer"))
    mask_metric: str = opt("magnitude", "mask scores: |W| or Wanda |W|*||X|| (here ||X|| comes from one pass of "
                                        "the dense model over the calibration windows cut to --block_size, for "
                                        "all layers at once: not prune.py's block-by-block Wanda, where later "
                                        "blocks see the already-pruned earlier ones)", ("magnitude", "wanda"))
    tie_break: str = opt("high", "of two equal scores in an N:M group keep the higher input index (measured best "
                                 "on a 4-bit-grid model, README) or the lower (this project's rule before)",
                         ("high", "low"))
    N: int = opt(2, "keep N of every M consecutive input weights")
    M: int = opt(4, "group size of the N:M pattern")
    sparsity: float = opt(0.5, "target sparsity of the unstructured mask types")
    change_mask: bool = opt(False, "recompute masks from the current weights every mask_update_interval steps "
                                   "(False: the initial mask stays, naive retraining)")
    mask_update_interval: int = opt(10, "optimizer steps between mask recomputes (alias: output_flip_every)")
    srste_decay: float = opt(6e-5, "SR-STE strength lambda on the pruned weights (the paper's AST command: 1e-4); "
                                   "0 = no decay term, same optimizer")
    increase_step: int = opt(10000, "lambda ramps linearly from 0 to srste_decay over this many steps; "
                                    "0 = constant")
    optimizer: str = opt("ast", "ast = the paper's AdamW variant for every run (u = m_hat + d, second moment from "
                                "u^2; with lambda 0 still this one, as published); classic = SR-STE's d added to "
                                "the gradient, then standard AdamW; adamw = torch's AdamW, no SR-STE term",
                         ("ast", "classic", "adamw"))
    SLoRB: bool = opt(False, "add the SLoRB low-rank residual to every sparse layer")
    SLoRB_k: int = opt(64, "SLoRB group size k (S has in/k columns; the paper's AST command: 16)")
    SLoRB_init_type: str = opt("mean", "SLoRB initialisation", ("mean", "sum", "xavier", "zero"))
    trainable_projection: bool = opt(False, "train SLoRB's projection X too (else a fixed reshape-and-sum)")
    prune_schedule: str = opt("none", "baselines: gradual = GMP (cubic ramp to N:M over prune_start..prune_end); "
                                      "iterative = IMP (prune_rounds rounds); none = N:M from step 0",
                              ("none", "gradual", "iterative"))
    prune_start: int = opt(0, "GMP/IMP: first pruning step")
    prune_end: int = opt(1000, "GMP/IMP: step at which the mask is exactly N:M")
    prune_rounds: int = opt(4, "IMP: number of prune-then-train rounds")
    # --- distillation
    distill_model: bool = opt(False, "distil from --teacher_model (CE + KL + SquareHead)")
    hardness_task: float = opt(1.0, "weight of the student's own cross-entropy (the paper's AST command: 0.33)")
    hardness_kldiv: float = opt(1.0, "weight of KL(teacher || student) on temperature-softened logits (the paper's "
                                     "AST command: 0.67)")
    hardness_squarehead: float = opt(1.0, "weight of the SquareHead loss on block outputs (needs a teacher of the "
                                          "same depth and width; the paper's AST command: 0)")
    distill_temperature: float = opt(2.0, "KL temperature tau (the loss is multiplied by tau^2)")
    distill_chunk_size: int = opt(0, "tokens per chunk of the distillation loss, bounding logits memory "
                                     "(0 = auto: on CPU 64 up to width 128, else 256; 2048 on GPUs)")
    teacher_dtype: str = opt("auto", "teacher weights dtype: auto = bfloat16 on GPU, float32 on CPU",
                             ("auto", "float32", "bfloat16", "float16"))
    # --- optimisation
    learning_rate: float = opt(1e-4, "peak learning rate")
    min_lr: float = opt(1e-5, "learning rate at lr_decay_iters")
    warmup_iters: int = opt(1000, "linear warmup steps")
    lr_warmup: str = opt("from_zero", "warm-up shape: from_zero = lr * it / warmup_iters, 0 at step 0 (published); "
                                      "nanogpt = lr * (it + 1) / (warmup_iters + 1) (newer nanoGPT)",
                         ("from_zero", "nanogpt"))
    lr_decay_iters: int = opt(20000, "end of the cosine decay")
    max_iters: int = opt(20000, "optimizer steps")
    lr_tail: str = opt("linear", "after lr_decay_iters: linear to 0 at max_iters (published) or hold min_lr",
                       ("linear", "hold"))
    weight_decay: float = opt(0.1, "decoupled weight decay on 2-D parameters")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0 = off)")
    batch_size: int = opt(1, "micro-batch size per rank, in sequences")
    global_batch_size: int = opt(128, "sequences per optimizer step over all ranks and micro-steps")
    block_size: int = opt(1024, "sequence length (at most the model's context)")
    gradient_checkpointing: bool = opt(False, "recompute each block in the backward pass to save memory")
    # --- system
    device: str = opt("auto", "auto = cuda if available, else cpu; or cpu, cuda, cuda:1, mps")
    dtype: str = opt("auto", "autocast dtype: auto = bfloat16 on GPUs that support it, float32 on CPU",
                     ("auto", "float32", "bfloat16", "float16"))
    backend: str = opt("auto", "DDP backend: auto = nccl on GPU, gloo on CPU", ("auto", "nccl", "gloo"))
    parallel: str = opt("ddp", "data parallelism under torchrun: ddp replicates the model on every rank; fsdp "
                               "shards weights, masks, gradients and optimizer state (FSDP2, checkpoints in "
                               "sharded folders)", ("ddp", "fsdp"))
    shard_teacher: bool = opt(True, "--parallel fsdp: shard the frozen teacher too (False: a full copy per rank, "
                                    "no gathers in its forward)")
    compile: bool = opt(False, "torch.compile the student (no gain on CPU)")
    num_threads: int = opt(0, "torch CPU threads per process (0 = torch's default)")
    # --- evaluation and logging
    eval_interval: int = opt(200, "steps between evaluations (and checkpoints)")
    eval_iters: int = opt(20, "C4 validation set: eval_iters x 8 fixed windows, whatever --batch_size")
    eval_block_size: int = opt(0, "WikiText-2 window and C4 validation sequence length (0 = the model's context, "
                                  "at most 4096, as evaluate.py and prune.py: comparable figures whatever "
                                  "--block_size trains on)")
    ppl_windows: int = opt(0, "WikiText-2 windows per evaluation (0 = the full test set)")
    final_eval_iters: int = opt(0, "C4 validation batches of the last evaluation, the one results.json reports "
                                   "(0 = --eval_iters): cheap evaluations for the curves, a precise final one")
    final_ppl_windows: int = opt(-1, "WikiText-2 windows of the last evaluation, the one results.json reports "
                                     "(-1 = --ppl_windows, 0 = the full test set)")
    eval_only: bool = opt(False, "evaluate the student (or init_from checkpoint) once and exit")
    zeroshot_tasks: str = opt("", "zero-shot accuracy of the final model (lm-evaluation-harness, as zeroshot.py) on "
                                  "these comma-separated tasks into results.json, e.g. boolq,rte,hellaswag,"
                                  "winogrande,arc_easy,arc_challenge,openbookqa ('' = none)")
    zeroshot_limit: int = opt(0, "--zeroshot_tasks on the first N examples of each task only (0 = the full splits)")
    log_interval: int = opt(10, "steps between console/metrics log lines")
    always_save_checkpoint: bool = opt(True, "save ckpt.pt at every evaluation, not only when val improves")
    progress: bool = opt(True, "show a tqdm progress bar")
    wandb_logging: bool = opt(False, "log to Weights & Biases (works with WANDB_MODE=offline)")
    wandb_project: str = opt("sparse-gpt2", "wandb project")
    wandb_run_name: str = opt("", "wandb run name ('' = out_dir's name)")


# Flags that may differ when a run is resumed (recorded in the checkpoint's `resumes`); every other flag, and any
# flag added later, defines the run and must match the checkpoint's config.
RESUME_MAY_CHANGE = frozenset({
    "config", "init_from", "out_dir", "overwrite", "keep_checkpoints", "max_iters", "eval_interval",
    "always_save_checkpoint", "eval_only", "log_interval", "progress", "wandb_logging", "wandb_project",
    "wandb_run_name", "num_threads", "compile", "backend", "gradient_checkpointing", "distill_chunk_size",
    "shard_teacher", "zeroshot_tasks", "zeroshot_limit", "final_eval_iters", "final_ppl_windows",
})
ALIASES = {"output_flip_every": "mask_update_interval"}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _convert(name, value):
    """Turn a flag string (or a config-file value) into the field's type, with a one-line error."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, type) else typing.get_type_hints(TrainConfig)[name]
    try:
        if kind is bool:
            value = parse_bool(value)
        elif kind is int:
            number = float(value)  # accepts 1e4 as well as 10000
            if isinstance(value, bool) or not number.is_integer():
                raise ValueError
            value = int(number)
        elif kind is float:
            value = float(value)
        else:
            value = str(value)
    except (ValueError, UserError):
        raise UserError(f"--{name}: expected {kind.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"--{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _canonical(name):
    name = ALIASES.get(name, name)
    if name not in FIELDS:
        lower = {k.lower(): k for k in FIELDS}
        name = lower.get(name.lower(), name)  # --slorb works for --SLoRB
    if name not in FIELDS:
        raise UserError(f"unknown flag --{name}{did_you_mean(name, [*FIELDS, *ALIASES])}; see "
                        f"`python main.py --help` for the valid flags")
    return name


def split_argv(argv):
    """['--a', '1', '--b=2'] -> [('a', '1'), ('b', '2')], order kept."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}: flags are --key value or --key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
                raise UserError(f"flag {arg} has no value: use {arg} VALUE or {arg}=VALUE")
            key, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((_canonical(key), value))
    return pairs


def explicit_keys(argv) -> set:
    """The settings the user chose (on the command line or in the --config file), as opposed to defaults."""
    pairs = split_argv(list(argv))
    keys = {key for key, _ in pairs}
    files = [value for key, value in pairs if key == "config"]
    return keys | set(load_config_file(files[-1])) if files else keys


def load_config_file(path):
    """Values from configs/NAME.py (module-level assignments) or a .json object."""
    candidates = [path, os.path.join(REPO_ROOT, path), os.path.join(REPO_ROOT, "configs", path),
                  os.path.join(REPO_ROOT, "configs", path + ".py")]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise UserError(f"config file {path!r} not found: give a path or a name in configs/")
    if found.endswith(".json"):
        with open(found) as f:
            values = json.load(f)
    else:
        values = {k: v for k, v in runpy.run_path(found).items()
                  if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
    out = {}
    for key, value in values.items():
        try:
            out[_canonical(key)] = value
        except UserError:
            raise UserError(f"{found}: unknown setting {key!r}{did_you_mean(key, [*FIELDS, *ALIASES])}; "
                            f"see `python main.py --help`") from None
    return out


def parse_config(argv) -> TrainConfig:
    pairs = split_argv(list(argv))
    values = {}
    config_files = [v for k, v in pairs if k == "config"]
    if config_files:
        for key, value in load_config_file(config_files[-1]).items():
            values[key] = _convert(key, value)
    for key, value in pairs:
        values[key] = _convert(key, value)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig):
    if not 0 < cfg.N <= cfg.M:
        raise UserError(f"invalid pattern --N {cfg.N} --M {cfg.M}: need 0 < N <= M (e.g. --N 2 --M 4)")
    if not 0.0 <= cfg.sparsity < 1.0:
        raise UserError(f"--sparsity {cfg.sparsity}: must be in [0, 1)")
    for name in ("batch_size", "global_batch_size", "block_size", "max_iters", "eval_iters", "log_interval",
                 "eval_interval", "mask_update_interval", "SLoRB_k", "prune_rounds", "keep_checkpoints"):
        if getattr(cfg, name) < 1 and not (name == "max_iters" and cfg.eval_only):
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "increase_step", "eval_block_size", "ppl_windows", "prune_start", "calib_nsamples", "num_threads",
                 "distill_chunk_size", "zeroshot_limit", "final_eval_iters"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be non-negative, got {getattr(cfg, name)}")
    if cfg.final_ppl_windows < -1:
        raise UserError(f"--final_ppl_windows must be -1 (= --ppl_windows), 0 (all) or more, got "
                        f"{cfg.final_ppl_windows}")
    if cfg.srste_decay < 0 or cfg.learning_rate < 0 or cfg.min_lr < 0:
        raise UserError("--srste_decay, --learning_rate and --min_lr must be non-negative")
    if cfg.prune_schedule != "none":
        if cfg.mode != "sparse_forward" or cfg.mask_type != "structured":
            raise UserError("--prune_schedule needs --mode sparse_forward --mask_type structured")
        if cfg.prune_end <= cfg.prune_start:
            raise UserError(f"--prune_end {cfg.prune_end} must be after --prune_start {cfg.prune_start}")
        if cfg.prune_end > cfg.max_iters and not cfg.eval_only:
            raise UserError(f"--prune_end {cfg.prune_end} is after --max_iters {cfg.max_iters}: the run would end "
                            f"before the mask is {cfg.N}:{cfg.M}; lower --prune_end or raise --max_iters")
        if cfg.mask_metric != "magnitude":
            raise UserError(f"--prune_schedule {cfg.prune_schedule} prunes by magnitude (GMP/IMP as published); "
                            f"--mask_metric {cfg.mask_metric} is not used by it: drop --mask_metric or use "
                            f"--prune_schedule none")
    if cfg.hardness_squarehead < 0 or cfg.hardness_kldiv < 0 or cfg.hardness_task < 0:
        raise UserError("the --hardness_* weights must be non-negative")
    if cfg.init_from == "scratch" and (cfg.n_embd % cfg.n_head or min(cfg.n_layer, cfg.n_head) < 1):
        raise UserError(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head} (both >= 1)")
    if cfg.parallel == "fsdp" and cfg.prune_schedule != "none":
        raise UserError("--prune_schedule (GMP/IMP) ranks weights over whole tensors, which --parallel fsdp splits "
                        "across ranks: use --parallel ddp for these baselines")
    if cfg.parallel == "fsdp" and cfg.compile:
        raise UserError("--compile True with --parallel fsdp is not supported here: drop one of them")
    if cfg.distill_temperature <= 0:
        raise UserError(f"--distill_temperature must be positive, got {cfg.distill_temperature}")
    if cfg.overwrite and cfg.init_from == "resume":
        raise UserError("--overwrite True and --init_from resume contradict each other: resume the run, or "
                        "replace it")


def config_warnings(cfg: TrainConfig) -> list:
    """Settings that are valid but cannot do what the user probably meant (main.py prints them)."""
    out = []
    if cfg.eval_only:
        return out
    if cfg.warmup_iters >= cfg.max_iters:
        out.append(f"--warmup_iters {cfg.warmup_iters} >= --max_iters {cfg.max_iters}: the whole run is warm-up and "
                   f"the learning rate never reaches --learning_rate {cfg.learning_rate:g} (the defaults are for a "
                   f"20,000-step run); set --warmup_iters and --lr_decay_iters for a run this long")
    elif cfg.lr_decay_iters > cfg.max_iters:
        out.append(f"--lr_decay_iters {cfg.lr_decay_iters} > --max_iters {cfg.max_iters}: the run ends before the "
                   f"cosine decay does (fine if you will resume it with a larger --max_iters)")
    if cfg.mode == "sparse_forward" and cfg.srste_decay > 0 and cfg.increase_step > cfg.max_iters:
        out.append(f"--increase_step {cfg.increase_step} > --max_iters {cfg.max_iters}: the SR-STE decay never "
                   f"reaches --srste_decay {cfg.srste_decay:g}")
    if cfg.mode == "sparse_forward" and cfg.optimizer == "adamw" and cfg.srste_decay > 0:
        out.append(f"--optimizer adamw has no SR-STE term: --srste_decay {cfg.srste_decay:g} does nothing (use "
                   f"--optimizer ast or classic for SR-STE, or --srste_decay 0 to silence this)")
    if cfg.mode == "dense" and (cfg.SLoRB or cfg.prune_schedule != "none"):
        out.append("--mode dense trains the plain model: --SLoRB and --prune_schedule do nothing")
    return out


def help_text() -> str:
    lines = ["usage: [torchrun --nproc_per_node=K] main.py [--config FILE] [--key value | --key=value ...]", "",
             "Booleans accept True/False/true/false/1/0. Flags (default):"]
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata.get("choices")
        extra = f" {{{', '.join(choices)}}}" if choices else ""
        lines.append(f"  --{f.name} ({f.default!r}){extra}\n      {f.metadata['help']}")
    return "\n".join(lines)


def flag_table_markdown() -> str:
    """The README's flag table, generated from the dataclass (a test keeps the README in sync)."""
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata.get("choices")
        extra = f" Choices: {', '.join(f'`{c}`' for c in choices)}." if choices else ""
        default = f"`{f.default}`" if f.default != "" else "`''`"
        rows.append(f"| `--{f.name}` | {default} | {f.metadata['help'].replace('|', '/')}{extra} |")
    return "\n".join(rows)
