"""Train a student (GPT-2 or any decoder-only transformers model) into an N:M sparse model (Adaptive Sparse
Training), on one process or under torchrun.

    python main.py --config configs/cpu_tiny.py
    torchrun --nproc_per_node=8 main.py --config ast_naive --student_model gpt2 --teacher_model gpt2
    torchrun --nproc_per_node=8 main.py --config ast_boosted --student_model opt-125m --teacher_model opt-125m \
        --block_size 2048 --data_dir data/c4_opt --wikitext_dir data/wikitext_opt

Every flag lives in config.py (`python main.py --help`); the distributed set-up (process group, DDP or FSDP2,
gradient-sync control, rank reductions) lives in parallelize.py. train() below reads top to bottom: start the
run, then per optimizer step evaluate and checkpoint when due, train_step() (LR and λ, micro-batches with
gradient accumulation, gradients reduced on the last only, clip, optimizer step), the mask recompute and the
log line. Its helpers take the run's state (a Run) as an argument.
"""
import dataclasses
import hashlib
import json
import math
import os
import shlex
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

import cli
import families
import parallelize
from checkpoint import (build_model, git_commit, load_model, load_sharded_into, model_state, rng_state,
                        save_checkpoint, save_sharded, save_training_checkpoint, set_rng_state, tokenizer_info)
from cli import EXIT_KEYBOARD_INTERRUPT, Interrupted, UserError
from config import TrainConfig, config_warnings, explicit_keys, help_text, parse_config
from data.loader import (BinDataset, GlobalBatchSampler, check_tokenizer, check_wikitext, load_calibration,
                         load_wikitext_tokens, micro_batches)
from data.tokenizer import prepare_flag
from evaluate import eval_window, sparsity_report, validation_loss, wikitext_perplexity
from model import GPT, GPTConfig
from parallelize import Runtime
from rundir import clear_run, open_run, trim_metrics
from sources import resolve
from sparsity import (SRSTEAdamW, local, magnitude_scores, partial_nm_mask, pruning_fraction, sparse_layers,
                      sparsify, srste_lambda, update_masks)


class TrainingDiverged(Exception):
    pass


class EvaluationDropped(Exception):
    """A stop was requested during an evaluation: it depends only on the weights and runs again on resume."""


# ------------------------------------------------------------------------------------------------ set-up
def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup (from 0 at step 0, as published), cosine to min_lr at lr_decay_iters, then linear to 0 at
    max_iters (or hold min_lr)."""
    if it < cfg.warmup_iters:
        if cfg.lr_warmup == "nanogpt":  # newer nanoGPT: never 0, so step 0 trains too
            return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
        return cfg.learning_rate * it / cfg.warmup_iters
    if it <= cfg.lr_decay_iters:
        span = max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
        ratio = (it - cfg.warmup_iters) / span
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
    if cfg.lr_tail == "hold" or cfg.max_iters <= cfg.lr_decay_iters:
        return cfg.min_lr
    return cfg.min_lr * max(cfg.max_iters - it, 0) / (cfg.max_iters - cfg.lr_decay_iters)


def data_flag(cfg: TrainConfig) -> str:
    """The prepare scripts' --tokenizer for the starting model, for the hint when a data file is missing."""
    return prepare_flag(cfg.init_from if cfg.init_from not in ("", "resume") else cfg.student_model)


def calibration_tokens(cfg: TrainConfig, train: BinDataset, model):
    """Wanda calibration windows: the file from prepare_calibration_data.py, or seeded windows of train.bin."""
    if cfg.calibration:
        tokens, meta = load_calibration(cfg.calibration, data_flag(cfg))
        check_tokenizer(meta, model, cfg.calibration)
        if tokens.shape[1] > cfg.block_size and cli.is_rank_zero():
            print(f"--mask_metric wanda: the calibration windows of {cfg.calibration} ({tokens.shape[1]} tokens) are "
                  f"cut to --block_size {cfg.block_size}")
        return tokens[:, :cfg.block_size]
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.randint(0, len(train) - cfg.block_size, (cfg.calib_nsamples,), generator=gen)
    return train.get_batch(offsets.numpy())[0]


def load_student(cfg: TrainConfig):
    """The starting model, through the one loader: a checkpoint, an export or a Hugging Face folder (any family)."""
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout))
    model = load_model(cfg.init_from or cfg.student_model, what="--init_from" if cfg.init_from else "--student_model")
    # the context is kept as long as the evaluation window needs (GPT-2's position embeddings are cropped to it);
    # a --block_size longer than the context is refused there
    return families.crop_context(model, max(cfg.block_size, eval_window(model, cfg.eval_block_size)),
                                 cfg.init_from or cfg.student_model)


def adopt_sparsity(model, cfg: TrainConfig, explicit) -> TrainConfig:
    """A sparse starting point (a checkpoint or an export) keeps its layers, masks and SLoRB exactly: the config
    takes their settings, so what the run records is what it trains; a flag the user set to something else stops."""
    layer = sparse_layers(model)[0][1]
    have = {"mode": "sparse_forward", "prune_schedule": "none", "mask_type": layer.mask_type,
            "mask_metric": layer.metric, "SLoRB": bool(layer.slorb_k), "tie_break": layer.ties}
    have.update({"N": layer.n, "M": layer.m} if layer.mask_type == "structured" else {"sparsity": layer.sparsity})
    if layer.slorb_k:
        have.update(SLoRB_k=layer.slorb_k, trainable_projection=layer.trainable_projection)
    source = cfg.init_from or cfg.student_model
    for key, value in have.items():
        if key in explicit and getattr(cfg, key) != value:
            raise UserError(f"--{key} {getattr(cfg, key)} contradicts {source}, which is already sparse with "
                            f"{key} = {value}: drop the flag (the model keeps its masks and SLoRB) or start "
                            f"from the dense model")
    return dataclasses.replace(cfg, **have)


def build_student(cfg: TrainConfig, explicit, rt: Runtime, train: BinDataset):
    """(the student before training, the config as it applies to it): a starting model made sparse as the flags
    say, or, when it is sparse already, kept exactly as it is (adopt_sparsity)."""
    model = load_student(cfg)
    train.check_model(model)
    if sparse_layers(model):
        cfg = adopt_sparsity(model, cfg, explicit)
    elif cfg.mode == "sparse_forward":
        hard = cfg.prune_schedule != "none"  # GMP/IMP: plain masked training, masks start all-ones
        tokens = calibration_tokens(cfg, train, model) if (cfg.mask_metric == "wanda" and not hard) else None

        def calib(mdl):  # Wanda: forward passes over the calibration windows (masks off, statistics on)
            for i in range(0, len(tokens), cfg.batch_size):
                with rt.ctx:
                    mdl(tokens[i:i + cfg.batch_size].to(rt.device))
        model.to(rt.device)
        try:
            sparsify(model, n=cfg.N, m=cfg.M, metric=cfg.mask_metric, filter_fn=families.sparse_filter(model),
                     mask_type=cfg.mask_type, sparsity=cfg.sparsity, slorb_k=cfg.SLoRB_k if cfg.SLoRB else 0,
                     slorb_init=cfg.SLoRB_init_type, trainable_projection=cfg.trainable_projection,
                     ste=not hard, calibrate=calib, init_masks=not hard, ties=cfg.tie_break)
        except ValueError as e:  # a pattern or SLoRB k that does not fit the model's widths
            raise UserError(str(e)) from None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model.to(rt.device), cfg


def configure_optimizer(model, cfg: TrainConfig, rt: Runtime):
    """The optimizer --optimizer names, whatever --srste_decay is (λ = 0 runs the same optimizer without the decay
    term, so "with and without SR-STE" compares the decay alone): ast / classic = SRSTEAdamW's paper or classic
    variant, adamw = torch's AdamW. Weight decay on 2-D params only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=rt.device_type == "cuda")
    layers = [layer for _, layer in sparse_layers(model)]
    variant = "paper" if cfg.optimizer == "ast" else "classic"
    return SRSTEAdamW(groups, lr=cfg.learning_rate, betas=betas, variant=variant, masked_modules=layers)


@torch.no_grad()
def apply_pruning_schedule(model, cfg: TrainConfig, step: int, current: float, optimizer=None) -> float:
    """GMP/IMP: prune the scheduled fraction of the N:M-pruned weights by magnitude; pruned stay pruned.

    A pruned weight and its optimizer state (Adam's moments) are zeroed: it then gets no gradient, so AdamW's
    momentum and weight decay leave it exactly zero in the stored weights too, not only in W * M."""
    fraction = pruning_fraction(step, cfg.prune_schedule, cfg.prune_start, cfg.prune_end, cfg.prune_rounds)
    due = cfg.prune_schedule == "iterative" or step % cfg.mask_update_interval == 0 or step >= cfg.prune_end
    if fraction == current or not due:
        return current
    for _, layer in sparse_layers(model):
        # scores of the effective weight: already pruned weights score 0 and can never come back
        layer.update_mask(partial_nm_mask(magnitude_scores(layer.effective_weight()), layer.n, layer.m, fraction,
                                          layer.ties))
        local(layer.weight).mul_(layer.mask)
        state = optimizer.state.get(layer.weight, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == layer.mask.shape:
                value.mul_(layer.mask)
    return fraction


def mask_digest(model) -> str:
    """sha256 over every sparse layer's name and mask bits: DDP ranks compare it at every checkpoint."""
    h = hashlib.sha256()
    for name, layer in sparse_layers(model):
        h.update(name.encode())
        h.update(layer.mask.cpu().numpy().tobytes())
    return h.hexdigest()


def masks_agree(digests, iter_num) -> bool:
    if len(set(digests)) > 1:
        raise RuntimeError(f"masks differ between ranks at iter {iter_num}: please report this as a bug")
    return True


class StopRequests:
    """SIGINT/SIGTERM handling. The first signal: the current step finishes (an evaluation in progress is
    dropped: it runs again on resume), the checkpoint is saved and the run exits with code 3. The second: a step
    in progress is dropped too (single process; under torchrun every rank finishes it, other ranks wait on it).
    The third: exit at once, without saving (the newest checkpoint on disk stays intact)."""

    def __init__(self, rt: Runtime, ckpt_path: str):
        self.rt, self.ckpt_path, self.count, self.name, self.saving = rt, ckpt_path, 0, None, False

    def __call__(self, signum, frame):
        self.count += 1
        self.name = self.name or signal.Signals(signum).name
        if self.count == 1:
            msg = (f"{self.name}: stopping after the current training step (an evaluation in progress is dropped; "
                   f"it runs again on resume), then saving {self.ckpt_path}; {self.name} again to stop sooner")
        elif self.count == 2 and not self.saving:
            msg = ("again: dropping the current step, saving the state before it" if not self.rt.ddp else
                   "again: under torchrun every rank finishes the current step before saving")
        elif self.count == 2:
            msg = "saving; once more to exit without it (the previous checkpoint on disk stays intact)"
        else:
            if self.rt.master:
                print(f"{self.name} a third time: exiting without saving; the newest checkpoint on disk is intact",
                      file=sys.stderr, flush=True)
            os._exit(EXIT_KEYBOARD_INTERRUPT)
        if self.rt.master:
            print(msg, file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (every rank calls it at the same points; the flag goes
        over the CPU control group, so it never waits for a GPU)."""
        return self.rt.any_rank(self.count > 0)

    def drop_evaluation(self):
        """Called before every evaluation batch (the same number of times on every rank)."""
        if self.requested():
            raise EvaluationDropped

    def drop_step(self) -> bool:
        """A second signal drops a step in progress (single process only: under DDP the others wait on it)."""
        return self.count >= 2 and not self.rt.ddp


def open_wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_logging True needs wandb: pip install wandb (or set --wandb_logging False)") \
            from None
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or os.path.basename(cfg.out_dir),
                      config=asdict(cfg), resume="allow")


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything a training run carries from step to step."""
    cfg: TrainConfig
    model: torch.nn.Module          # what the forward goes through (DDP / compiled); == raw under FSDP
    raw: torch.nn.Module            # the model itself (sharded in place under FSDP)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    distiller: object
    train_data: BinDataset
    val_data: BinDataset
    wikitext: torch.Tensor
    sampler: GlobalBatchSampler
    accum: int
    ckpt_path: str
    resumed: bool = False
    iter_num: int = 0
    best_val: float = float("inf")
    train_seconds: float = 0.0
    pruned_fraction: float = 0.0
    flip: tuple = (0.0, 0.0)
    flip_iter: int = -1  # the iteration of the last mask recompute
    last_eval_iter: int = -1
    resumes: list = field(default_factory=list)  # the allowed flag changes of every resume
    nonfinite: torch.Tensor = None  # set on the device when a step's gradient norm was not finite
    t_start: float = field(default_factory=time.time)

    def seconds(self):
        return self.train_seconds + time.time() - self.t_start


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return
    cfg = parse_config(argv)
    if int(os.environ.get("RANK", 0)) == 0:  # a log starts with what made it
        print(f"command: {shlex.join([os.path.basename(sys.executable), 'main.py', *argv])}")
        print(f"config: {json.dumps(asdict(cfg))}", flush=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rt = Runtime(cfg)
    try:
        return train(cfg, rt, explicit_keys(argv))
    finally:
        rt.close()


def exit_torchrun_worker(code: int):
    """A torchrun worker ends with os._exit() once its files are closed and its output flushed.

    A gloo process group cannot really be destroyed here: DDP leaves references to it behind, so after
    destroy_process_group() its worker threads keep running. Each of them frees a finished collective only
    after the caller's wait() has returned. If that lands after a normal exit has begun finalizing the
    interpreter, freeing the work's thread-local state (which holds a Python object) needs the GIL, Python
    ends the thread with pthread_exit, the forced unwind meets a noexcept C++ frame and std::terminate()
    aborts the rank: "terminate called without an active exception", SIGABRT, after a finished run (about 1 in
    40 of the tests' 2-rank runs under CPU load). Skipping finalization leaves those threads nothing to race.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def checkpoint_path(cfg: TrainConfig, name="ckpt"):
    """out_dir/ckpt.pt, or under --parallel fsdp the sharded folder out_dir/ckpt."""
    return os.path.join(cfg.out_dir, name + (".pt" if cfg.parallel == "ddp" else ""))


def start_run(cfg: TrainConfig, rt: Runtime, explicit) -> Run:
    """Data, student, teacher, optimizer and (on resume) the saved state, wrapped for DDP or sharded for FSDP.
    Nothing is written before open_run() has checked the out_dir (rundir.py)."""
    resumed_from, ckpt, changes, cfg = open_run(cfg, explicit, rt.master)
    resume = ckpt is not None
    sharded = cfg.parallel == "fsdp"
    if rt.master:
        for warning in config_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)

    # ---- flags that name files, and the data (checked before the model is loaded, so a typo fails fast)
    explicit_start = cfg.init_from not in ("", "scratch", "resume")
    if explicit_start and not os.path.exists(resolve(cfg.init_from, "--init_from").path):
        raise UserError(f"--init_from {cfg.init_from!r} is none of: resume, scratch, an existing checkpoint "
                        f"file, an export or Hugging Face model folder, a .gguf file or a cached hub id")
    flag = data_flag(cfg)
    train_data = BinDataset(os.path.join(cfg.data_dir, "train.bin"), cfg.block_size, flag)
    val_data = BinDataset(os.path.join(cfg.data_dir, "val.bin"), cfg.block_size, flag)
    wikitext = load_wikitext_tokens(cfg.wikitext_dir, "test", flag) if cfg.wikitext_dir else None  # '' = none
    per_step = cfg.batch_size * rt.world_size
    if cfg.global_batch_size % per_step:
        raise UserError(f"--global_batch_size {cfg.global_batch_size} is not divisible by --batch_size "
                        f"{cfg.batch_size} x {rt.world_size} ranks; pick sizes where it divides")
    if cfg.zeroshot_tasks:  # task names and files checked now; scored on the final model in finish()
        import zeroshot
        zeroshot.task_files(zeroshot.parse_tasks(cfg.zeroshot_tasks))
    sampler = GlobalBatchSampler(len(train_data), cfg.block_size, cfg.global_batch_size, cfg.seed)

    # ---- model, teacher, optimizer (same seed on every rank: identical initial state everywhere)
    torch.manual_seed(cfg.seed)
    if resume:
        model = build_model({**ckpt, "model": ckpt["model"] if not sharded else None}).to(rt.device)
        train_data.check_model(model)
        model.gradient_checkpointing = cfg.gradient_checkpointing
    else:
        model, cfg = build_student(cfg, explicit, rt, train_data)
    if cfg.block_size > model.config.block_size:
        raise UserError(f"--block_size {cfg.block_size} exceeds the model's context {model.config.block_size}")
    eval_block_size = eval_window(model, cfg.eval_block_size)
    if eval_block_size != cfg.block_size:
        val_data = BinDataset(os.path.join(cfg.data_dir, "val.bin"), eval_block_size, flag)
    val_data.check_model(model)
    if wikitext is not None:
        check_wikitext(cfg.wikitext_dir, wikitext, model)
    bf16_shards = rt.device_type == "cuda" and rt.dtype == "bfloat16"
    distiller = None
    if cfg.distill_model:
        from distill import Distiller, load_teacher

        tdtype = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else \
            ("bfloat16" if rt.device_type == "cuda" else "float32")
        teacher = load_teacher(cfg.teacher_model, rt.device, tdtype, block_size=cfg.block_size)
        theirs, ours = tokenizer_info(teacher.model)["fingerprint"], tokenizer_info(model)["fingerprint"]
        if theirs and ours and theirs != ours:
            raise UserError(f"--teacher_model {cfg.teacher_model} uses another tokenizer than the student: "
                            f"distillation compares logits token by token, so pick a teacher of the same tokenizer")
        trained = dataclasses.replace(model.config, block_size=cfg.block_size)  # the teacher sees training windows
        distiller = Distiller(teacher, trained, cfg.hardness_task, cfg.hardness_kldiv,
                              cfg.hardness_squarehead, cfg.distill_temperature, cfg.distill_chunk_size)
        if sharded and cfg.shard_teacher:
            parallelize.apply_fsdp(teacher.model, rt, bf16=bf16_shards)
    if sharded:  # before the optimizer: fully_shard replaces every parameter with a DTensor
        parallelize.apply_fsdp(model, rt, bf16=bf16_shards)
    run = Run(cfg=cfg, model=model, raw=model, optimizer=configure_optimizer(model, cfg, rt),
              scaler=torch.amp.GradScaler(enabled=rt.dtype == "float16"), distiller=distiller,
              train_data=train_data, val_data=val_data, wikitext=wikitext, sampler=sampler,
              accum=cfg.global_batch_size // per_step, ckpt_path=checkpoint_path(cfg), resumed=resume,
              nonfinite=torch.zeros((), dtype=torch.bool, device=rt.device))
    if resume:
        if sharded:
            load_sharded_into(resumed_from, model, run.optimizer)
        else:
            run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.iter_num, run.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        run.train_seconds, run.pruned_fraction = ckpt.get("train_seconds", 0.0), ckpt.get("pruned_fraction", 0.0)
        run.last_eval_iter = ckpt.get("last_eval_iter", run.iter_num)
        run.flip = tuple(ckpt.get("flip", (0.0, 0.0)))
        run.resumes = ckpt.get("resumes", []) + ([{"iter": run.iter_num, "changed": changes}] if changes else [])
        rngs = ckpt["rng"]
        set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
        if rt.master:
            changed = "".join(f", --{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(f"resuming {resumed_from} at iter {run.iter_num}{changed}")
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout may differ per rank; data does not depend on it
    if cfg.compile:
        run.model = torch.compile(run.model)
    if rt.ddp and not sharded:
        run.model = parallelize.wrap_ddp(run.model, rt)
    if cfg.prune_schedule != "none" and not resume:
        run.pruned_fraction = apply_pruning_schedule(model, cfg, 0, run.pruned_fraction)
    return run


def evaluate_run(run: Run, rt: Runtime, should_stop=None, final=False):
    """(C4 validation loss, WikiText-2 perplexity) of the student, every rank taking its share of the windows.
    should_stop is called before every batch; it raises to drop the evaluation. final: the sizes results.json
    reports (--final_eval_iters / --final_ppl_windows: cheap evaluations for the curves, a precise last one)."""
    cfg = run.cfg
    iters, windows = final_sizes(cfg) if final else (cfg.eval_iters, cfg.ppl_windows)
    progress = cfg.progress and rt.master
    val = validation_loss(run.raw, run.val_data, cfg.batch_size, iters, rt.device, rt.ctx, rt.rank,
                          rt.world_size, should_stop=should_stop, progress=progress)
    ppl = None if run.wikitext is None else wikitext_perplexity(
        run.raw, run.wikitext, run.val_data.block_size, windows, cfg.batch_size, rt.device, rt.ctx, rt.rank, rt.world_size,
        should_stop=should_stop, progress=progress)
    return val, ppl


def eval_line(val, ppl):
    """'val loss X, wikitext-2 ppl Y' (without the perplexity under --wikitext_dir '')."""
    return f"val loss {val:.4f}" + ("" if ppl is None else f", wikitext-2 ppl {ppl:.2f}")


def final_sizes(cfg: TrainConfig):
    """(C4 validation iters, WikiText-2 windows) of the evaluation results.json reports."""
    return (cfg.final_eval_iters or cfg.eval_iters,
            cfg.ppl_windows if cfg.final_ppl_windows == -1 else cfg.final_ppl_windows)


def evaluate_final(run: Run, rt: Runtime, log):
    """The evaluation results.json reports; logged as final_* when its sizes differ from the curves'."""
    val, ppl = evaluate_run(run, rt, final=True)
    iters, windows = final_sizes(run.cfg)
    if (iters, windows) != (run.cfg.eval_iters, run.cfg.ppl_windows):
        log({"iter": run.iter_num, "final_val_loss": val, "final_wikitext_ppl": ppl})
        log.say(f"iter {run.iter_num}: final evaluation ({iters} C4 batches, {windows or 'all'} WikiText-2 "
                f"windows): {eval_line(val, ppl)}")
    return val, ppl


def save_run(run: Run, rt: Runtime, best=False):
    """The training checkpoint (ckpt-ITER.pt, the newest K kept, ckpt.pt the newest) or, with best=True, the
    model-only best.pt, written by rank 0; under FSDP a sharded folder (ckpt/ or best/) from every rank."""
    if bool(run.nonfinite):  # never write weights that a non-finite step has touched
        raise TrainingDiverged(f"non-finite gradient norm before iter {run.iter_num}")
    cfg = run.cfg
    sharded = parallelize.is_sharded(run.raw)
    # every rank's RNG state, and under DDP its mask digest (all ranks' masks must be identical)
    gathered = rt.gather((rng_state(), "" if (best or sharded) else mask_digest(run.raw)))
    masks_agree([d for _, d in gathered], run.iter_num)
    state = {"config": asdict(cfg), "git_commit": git_commit(), "iter_num": run.iter_num,
             "best_val_loss": run.best_val}
    if not best:
        state.update(scaler=run.scaler.state_dict(), rng=[r for r, _ in gathered], train_seconds=run.seconds(),
                     pruned_fraction=run.pruned_fraction, last_eval_iter=run.last_eval_iter, flip=list(run.flip),
                     resumes=run.resumes, lr=get_lr(run.iter_num, cfg),
                     srste_lambda=srste_lambda(run.iter_num, cfg.srste_decay, cfg.increase_step))
    if sharded:
        save_sharded(checkpoint_path(cfg, "best" if best else "ckpt"), run.raw, None if best else run.optimizer,
                     {**model_state(run.raw, weights=False), **state}, rt.rank)
    elif rt.master and best:
        save_checkpoint({**model_state(run.raw), **state}, os.path.join(cfg.out_dir, "best.pt"))
    elif rt.master:
        save_training_checkpoint({**model_state(run.raw), **state, "optimizer": run.optimizer.state_dict()},
                                 cfg.out_dir, cfg.keep_checkpoints)


def train_step(run: Run, rt: Runtime, stop: StopRequests):
    """One optimizer step: (mean loss, mean loss parts, lr, λ) as device tensors, no host synchronisation; or
    None when a second stop signal dropped the step (as if it had not started: no gradients, the RNG state from
    before it)."""
    cfg = run.cfg
    step_rng = rng_state() if not rt.ddp else None
    lr = get_lr(run.iter_num, cfg)
    lam = srste_lambda(run.iter_num, cfg.srste_decay, cfg.increase_step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
        group["srste_lambda"] = lam
    loss_sum = torch.zeros((), device=rt.device)
    part_sums = {}
    batches = micro_batches(run.train_data, run.sampler, run.iter_num, rt.rank, rt.world_size, cfg.batch_size,
                            rt.device)
    for micro_step, (x, y) in enumerate(batches):
        if stop.drop_step():
            run.optimizer.zero_grad(set_to_none=True)
            set_rng_state(step_rng)
            return None
        # gradients are reduced on the last micro-step only (DDP: no_sync covers the forward too)
        with parallelize.grad_sync(run.model, rt, last=micro_step == run.accum - 1):
            with rt.ctx:
                if run.distiller is not None:
                    loss, parts = run.distiller(run.model, x, y)
                else:
                    _, loss = run.model(x, targets=y, return_logits=False)  # fused lm_head + CE
                    parts = {}
            run.scaler.scale(loss / run.accum).backward()
        loss_sum += loss.detach() / run.accum
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0.0) + v.float() / run.accum
    if cfg.grad_clip > 0 or rt.dtype != "float16":
        run.scaler.unscale_(run.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), max_norm)
        if rt.dtype != "float16":
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            run.nonfinite |= ~torch.isfinite(grad_norm)
            # on a GPU the flag is read at the next log line or save (no host sync per step); on a CPU reading
            # it costs nothing, so the step with the bad gradient is never taken
            if rt.device_type == "cpu" and bool(run.nonfinite):
                raise TrainingDiverged(f"non-finite gradient at iter {run.iter_num} (loss {loss_sum.item():.4g})")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    return loss_sum, part_sums, lr, lam


def update_masks_after_step(run: Run, rt: Runtime, log):
    """Recompute masks from the updated weights (each rank its own rows under FSDP, all rows under DDP, where
    weights and so masks are identical everywhere); GMP/IMP follow their pruning schedule instead."""
    cfg = run.cfg
    if cfg.mode != "sparse_forward":
        return
    if cfg.prune_schedule != "none":
        run.pruned_fraction = apply_pruning_schedule(run.raw, cfg, run.iter_num, run.pruned_fraction, run.optimizer)
    elif cfg.change_mask and run.iter_num % cfg.mask_update_interval == 0:
        reduce = rt.all_reduce_sum if parallelize.is_sharded(run.raw) else None
        run.flip = update_masks(run.raw, all_reduce_sum=reduce)
        run.flip_iter = run.iter_num
        log({"iter": run.iter_num, "flip_ratio": run.flip[0], "flip_ratio_init": run.flip[1]})


def finish(run: Run, rt: Runtime, val, ppl):
    """results.json: the final evaluation and what the model is (read off the model, not the flags)."""
    cfg = run.cfg
    sharded = parallelize.is_sharded(run.raw)
    # under FSDP each rank holds other rows of the masks by design; under DDP they must be identical
    agree = None if sharded else masks_agree(rt.gather(mask_digest(run.raw)), run.iter_num)
    iters, windows = final_sizes(cfg)
    result = {"world_size": rt.world_size, "parallel": cfg.parallel, "masks_identical_across_ranks": agree,
              "iter": run.iter_num, "tokens": run.iter_num * cfg.global_batch_size * cfg.block_size,
              "val_loss": val, "wikitext_ppl": ppl, "best_val_loss": run.best_val, "ppl_windows": windows,
              "eval_block_size": run.val_data.block_size,
              "eval_iters": iters,
              "train_seconds": round(run.seconds(), 2),
              **sparsity_report(run.raw, all_reduce_sum=rt.all_reduce_sum if sharded else None),
              "config": asdict(cfg), "resumes": run.resumes}
    if cfg.zeroshot_tasks and (rt.master or sharded):
        # lm-evaluation-harness on the final model in memory, as zeroshot.py; a sharded model's forwards are
        # collectives, so every rank then scores the same requests
        import zeroshot
        result["zeroshot"] = zeroshot.evaluate_model(run.raw, cfg.zeroshot_tasks, cfg.zeroshot_limit,
                                                     cfg.batch_size, rt.device, rt.ctx,
                                                     progress=cfg.progress and rt.master)
        if rt.master:
            print(zeroshot.report(result["zeroshot"]))
    if rt.master:
        cli.write_json(os.path.join(cfg.out_dir, "results.json"), result)
    return result


class Log:
    """metrics.jsonl rows, wandb and the console (through the progress bar when there is one), from rank 0.
    Opening it is the run's first write into out_dir: --overwrite clears the previous run's files, and a
    resume trims metrics.jsonl to the checkpoint's iteration (rows a crash left after it are written again)."""

    def __init__(self, run: Run, rt: Runtime):
        cfg = run.cfg
        self.master = rt.master
        os.makedirs(cfg.out_dir, exist_ok=True)
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        if rt.master and cfg.overwrite and not cfg.eval_only:  # --eval_only replaces results.json, nothing else
            clear_run(cfg.out_dir)
        if rt.master and run.resumed:
            trim_metrics(path, run.iter_num)
        self.metrics = open(path, "a") if rt.master else None
        self.wandb = open_wandb(cfg) if (cfg.wandb_logging and rt.master) else None
        self.bar = None

    def __call__(self, row):
        if self.master:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            if self.wandb is not None:
                self.wandb.log(row, step=row["iter"])

    def say(self, text):
        if self.master:
            (self.bar.write if self.bar is not None else print)(text)

    def progress(self, total, initial):
        if self.master:  # a bar on a terminal, else a line with the ETA at most every 30 s
            self.bar = cli.Progress(total, "train", unit="step", initial=initial)

    def close(self):
        for thing in (self.bar, self.metrics):
            if thing is not None:
                thing.close()
        if self.wandb is not None:
            self.wandb.finish()


def train(cfg: TrainConfig, rt: Runtime, explicit=frozenset()):
    run = start_run(cfg, rt, explicit)
    cfg = run.cfg  # a sparse starting point's or the resumed run's settings, where they replaced defaults
    log = Log(run, rt)
    if cfg.eval_only:
        val, ppl = evaluate_final(run, rt, log)
        log.say(f"eval: {eval_line(val, ppl)}")
        log.close()
        return finish(run, rt, val, ppl)

    # ---- signals: say at once what happens, finish the step, save, exit with code 3 (see StopRequests)
    stop = StopRequests(rt, run.ckpt_path)
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    n_params = sum(p.numel() for p in run.raw.parameters())
    log.say(f"{rt.world_size} rank(s) on {rt.device} ({rt.dtype}, {cfg.parallel}), {n_params / 1e6:.2f}M "
            f"parameters, {len(sparse_layers(run.raw))} sparse layers, grad accumulation {run.accum}, "
            f"{cfg.global_batch_size * cfg.block_size:,} tokens per step")
    if cfg.progress:
        log.progress(cfg.max_iters, run.iter_num)

    t_log, steps_since_log, last_log_iter = time.time(), 0, run.iter_num
    val = ppl = None
    try:
        while True:
            if stop.requested():  # the state is consistent here: save it and exit
                stop.saving = True
                save_run(run, rt)
                raise Interrupted(f"stopped by {stop.name} at iter {run.iter_num}: {run.ckpt_path} saved; continue "
                                  f"with the same flags and --init_from resume")
            # ---- evaluate and checkpoint (before the step; never twice at the same iteration)
            it = run.iter_num
            if (it % cfg.eval_interval == 0 or it >= cfg.max_iters) and it != run.last_eval_iter:
                t_eval = time.time()
                try:
                    val, ppl = evaluate_run(run, rt, should_stop=stop.drop_evaluation)
                except EvaluationDropped:
                    continue
                run.last_eval_iter = it
                improved = val < run.best_val
                run.best_val = min(run.best_val, val)
                log({"iter": it, "val_loss": val, "wikitext_ppl": ppl})
                log.say(f"iter {it}: {eval_line(val, ppl)}")
                if it > 0 and improved:  # before the checkpoint: one at iter N implies best.pt is current
                    save_run(run, rt, best=True)
                if 0 < it < cfg.max_iters and (improved or cfg.always_save_checkpoint):
                    save_run(run, rt)  # the final one is written after the loop
                t_log += time.time() - t_eval  # ms/iter and tok/s count training time only
            if run.iter_num >= cfg.max_iters:
                if final_sizes(cfg) != (cfg.eval_iters, cfg.ppl_windows):
                    val, ppl = evaluate_final(run, rt, log)
                break

            step = train_step(run, rt, stop)
            if step is None:  # dropped by a second signal: the loop's stop check saves and exits
                continue
            loss_sum, part_sums, lr, lam = step
            steps_since_log += 1
            if log.bar is not None:
                log.bar.update(1)
            update_masks_after_step(run, rt, log)

            # ---- log (the only host synchronisation of a step, every log_interval steps)
            if run.iter_num % cfg.log_interval == 0 or run.iter_num == cfg.max_iters:
                loss_val = rt.all_reduce_mean(loss_sum).item()
                parts = {k: rt.all_reduce_mean(v.clone()).item() for k, v in sorted(part_sums.items())}
                if bool(rt.all_reduce_sum(run.nonfinite.float())) or not math.isfinite(loss_val):
                    raise TrainingDiverged(f"non-finite loss or gradient by iter {run.iter_num} (loss {loss_val:.4g})")
                dt = (time.time() - t_log) / steps_since_log
                t_log, steps_since_log = time.time(), 0
                tok_s = cfg.global_batch_size * cfg.block_size / dt
                # flip ratios where masks are selected by score (a dense run has none; GMP/IMP masks change by
                # pruning, their pruned fraction says how far)
                reselected = cfg.mode == "sparse_forward" and cfg.prune_schedule == "none"
                row = {"iter": run.iter_num, "loss": loss_val, "lr": lr, "lambda": lam,
                       **({"flip_ratio": run.flip[0], "flip_ratio_init": run.flip[1]} if reselected else {}),
                       "ms_per_iter": dt * 1000, "tokens_per_s": tok_s,
                       **({"pruned_fraction": run.pruned_fraction} if cfg.prune_schedule != "none" else {}),
                       **parts}
                log(row)
                extra = "".join(f", {k} {v:.4f}" for k, v in parts.items())
                # the flip ratio only on a line after masks were recomputed (else it is the old figure again)
                flip = f", flip {run.flip[0]:.4f}" if reselected and run.flip_iter > last_log_iter else ""
                last_log_iter = run.iter_num
                log.say(f"iter {run.iter_num}: loss {loss_val:.4f}{extra}, lr {lr:.2e}, lambda {lam:.2e}"
                        f"{flip}, {dt * 1000:.0f} ms/iter, {tok_s:,.0f} tok/s")
        save_run(run, rt)
    except TrainingDiverged as e:
        raise UserError(f"{e}: training stopped, the last good checkpoint ({run.ckpt_path}) is kept; lower "
                        f"--learning_rate or check the data") from None
    finally:
        log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if val is None:  # resumed a run that had already finished: report it again
        val, ppl = evaluate_run(run, rt, final=True)
    return finish(run, rt, val, ppl)


if __name__ == "__main__":
    if "RANK" not in os.environ:
        cli.run(main)
    else:
        try:
            cli.run(main)
            exit_torchrun_worker(0)
        except SystemExit as e:  # cli.run's exit codes (2 user error, 3 interrupted, ...)
            exit_torchrun_worker(e.code if isinstance(e.code, int) else 1)
        except BaseException:  # a bug: its traceback, then exit 1 as Python would
            traceback.print_exc()
            exit_torchrun_worker(1)
