"""Train a GPT-2 student into an N:M sparse model (Adaptive Sparse Training), on one process or under torchrun.

    python main.py --config configs/cpu_tiny.py
    torchrun --nproc_per_node=8 main.py --config ast_naive --student_model gpt2 --teacher_model gpt2

Every flag lives in config.py (`python main.py --help`). train() below reads top to bottom as one
optimizer step: LR and λ for the step, micro-batches with gradient accumulation (DDP syncs only on the last,
forward and backward both inside no_sync), clip, optimizer step, then the mask recompute, logging, evaluation
and checkpoints.
"""
import contextlib
import hashlib
import inspect
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
from checkpoint import (build_model, git_commit, load_checkpoint, model_state, rng_state, save_checkpoint,
                        save_training_checkpoint, set_rng_state)
from cli import EXIT_KEYBOARD_INTERRUPT, Interrupted, UserError
from config import TrainConfig, config_warnings, help_text, parse_config
from data.loader import BinDataset, GlobalBatchSampler, load_calibration, load_wikitext_tokens, micro_batches
from evaluate import sparsity_report, validation_loss, wikitext_perplexity
from model import GPT, GPTConfig
from rundir import clear_run, open_run, trim_metrics, write_json
from sparsity import (SRSTEAdamW, magnitude_scores, partial_nm_mask, pruning_fraction, sparse_layers, sparsify,
                      srste_lambda, update_masks)

PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingDiverged(Exception):
    pass


class EvaluationDropped(Exception):
    """A stop was requested during an evaluation: it depends only on the weights and runs again on resume."""


# ------------------------------------------------------------------------------------------------ set-up
class Runtime:
    """Rank, world size, device and autocast context of this process."""

    def __init__(self, cfg: TrainConfig):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("--device cuda but no GPU is visible; use --device cpu")
            if self.ddp:
                device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
        dtype = cfg.dtype
        if dtype == "auto":
            bf16_ok = self.device_type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if bf16_ok else "float32"
        self.dtype = dtype
        if dtype == "float32":
            self.ctx = contextlib.nullcontext()
        else:
            if self.device_type == "cpu" and self.rank == 0:
                print(f"warning: {dtype} autocast on CPU is usually far slower than float32", file=sys.stderr)
            self.ctx = torch.autocast(device_type=self.device_type, dtype=PTDTYPE[dtype])
        if self.ddp:
            backend = cfg.backend if cfg.backend != "auto" else ("nccl" if self.device_type == "cuda" else "gloo")
            dist.init_process_group(backend=backend)
        self.master = self.rank == 0

    def all_reduce_mean(self, t):
        if self.ddp:
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def gather(self, obj) -> list:
        """obj of every rank, in rank order (every rank must call it at the same step)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_rank(self, flag: bool) -> bool:
        """True if any rank's flag is set (every rank must call it at the same step)."""
        if not self.ddp:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, cosine to min_lr at lr_decay_iters, then linear to 0 at max_iters (or hold min_lr)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it <= cfg.lr_decay_iters:
        span = max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
        ratio = (it - cfg.warmup_iters) / span
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
    if cfg.lr_tail == "hold" or cfg.max_iters <= cfg.lr_decay_iters:
        return cfg.min_lr
    return cfg.min_lr * max(cfg.max_iters - it, 0) / (cfg.max_iters - cfg.lr_decay_iters)


def calibration_tokens(cfg: TrainConfig, train: BinDataset):
    """Wanda calibration windows: the file from prepare_calibration_data.py, or seeded windows of train.bin."""
    if cfg.calibration:
        tokens, _ = load_calibration(cfg.calibration)
        return tokens[:, :cfg.block_size]
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.randint(0, len(train) - cfg.block_size, (cfg.calib_nsamples,), generator=gen)
    return train.get_batch(offsets.numpy())[0]


def build_student(cfg: TrainConfig, rt: Runtime, train: BinDataset) -> GPT:
    """The student before training: a model folder (or a checkpoint) made sparse as the flags say."""
    init = cfg.init_from
    if init and init != "resume" and os.path.isfile(init):
        model = build_model(load_checkpoint(init))  # e.g. a one-shot pruned model from prune.py
        if cfg.block_size > model.config.block_size:
            raise UserError(f"--block_size {cfg.block_size} exceeds the context of {init} "
                            f"({model.config.block_size})")
    elif init == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, dropout=cfg.dropout))
    else:
        model = GPT.from_pretrained(init or cfg.student_model, block_size=cfg.block_size)
    if cfg.mode == "sparse_forward" and not sparse_layers(model):
        hard = cfg.prune_schedule != "none"  # GMP/IMP: plain masked training, masks start all-ones
        tokens = calibration_tokens(cfg, train) if (cfg.mask_metric == "wanda" and not hard) else None

        def calib(mdl):  # Wanda: forward passes over the calibration windows (masks off, statistics on)
            for i in range(0, len(tokens), cfg.batch_size):
                with rt.ctx:
                    mdl(tokens[i:i + cfg.batch_size].to(rt.device))
        model.to(rt.device)
        try:
            sparsify(model, n=cfg.N, m=cfg.M, metric=cfg.mask_metric, mask_type=cfg.mask_type,
                     sparsity=cfg.sparsity, slorb_k=cfg.SLoRB_k if cfg.SLoRB else 0,
                     slorb_init=cfg.SLoRB_init_type, trainable_projection=cfg.trainable_projection,
                     ste=not hard, calibrate=calib, init_masks=not hard)
        except ValueError as e:  # a pattern or SLoRB k that does not fit the model's widths
            raise UserError(str(e)) from None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model.to(rt.device)


def configure_optimizer(model: GPT, cfg: TrainConfig, rt: Runtime):
    """AdamW; with SR-STE on, SRSTEAdamW (the paper's variant or the classic one). Decay on 2-D params only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.mode == "sparse_forward" and cfg.srste_decay > 0:
        layers = [layer for _, layer in sparse_layers(model)]
        variant = "paper" if cfg.optimizer == "ast" else "classic"
        return SRSTEAdamW(groups, lr=cfg.learning_rate, betas=betas, variant=variant, masked_modules=layers)
    fused = rt.device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)


@torch.no_grad()
def apply_pruning_schedule(model: GPT, cfg: TrainConfig, step: int, current: float, optimizer=None) -> float:
    """GMP/IMP: prune the scheduled fraction of the N:M-pruned weights by magnitude; pruned stay pruned.

    A pruned weight and its optimizer state (Adam's moments) are zeroed: it then gets no gradient, so AdamW's
    momentum and weight decay leave it exactly zero in the stored weights too, not only in W * M."""
    fraction = pruning_fraction(step, cfg.prune_schedule, cfg.prune_start, cfg.prune_end, cfg.prune_rounds)
    due = cfg.prune_schedule == "iterative" or step % cfg.mask_update_interval == 0 or step >= cfg.prune_end
    if fraction == current or not due:
        return current
    for _, layer in sparse_layers(model):
        # scores of the effective weight: already pruned weights score 0 and can never come back
        layer.update_mask(partial_nm_mask(magnitude_scores(layer.weight * layer.mask), layer.n, layer.m, fraction))
        layer.weight.mul_(layer.mask)
        state = optimizer.state.get(layer.weight, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == layer.mask.shape:
                value.mul_(layer.mask)
    return fraction


def mask_digest(model: GPT) -> str:
    """sha256 over every sparse layer's name and mask bits: ranks compare it at every checkpoint."""
    h = hashlib.sha256()
    for name, layer in sparse_layers(model):
        h.update(name.encode())
        h.update(layer.mask.cpu().numpy().tobytes())
    return h.hexdigest()


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
        """True on every rank once any rank got a signal (a collective under torchrun: all ranks call it)."""
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
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return
    cfg = parse_config(argv)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rt = Runtime(cfg)
    try:
        return train(cfg, rt)
    finally:
        if rt.ddp and dist.is_initialized():
            dist.destroy_process_group()


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


def train(cfg: TrainConfig, rt: Runtime):
    resume = cfg.init_from == "resume"
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resumed_from, ckpt, changes = open_run(cfg, rt.master)  # nothing is written before this check
    if rt.master:
        for warning in config_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)

    # ---- data (checked before the model is loaded, so a typo fails fast)
    train_data = BinDataset(os.path.join(cfg.data_dir, "train.bin"), cfg.block_size)
    val_data = BinDataset(os.path.join(cfg.data_dir, "val.bin"), cfg.block_size)
    wikitext = load_wikitext_tokens(cfg.wikitext_dir, "test")
    per_step = cfg.batch_size * rt.world_size
    if cfg.global_batch_size % per_step:
        raise UserError(f"--global_batch_size {cfg.global_batch_size} is not divisible by --batch_size "
                        f"{cfg.batch_size} x {rt.world_size} ranks; pick sizes where it divides")
    accum = cfg.global_batch_size // per_step
    sampler = GlobalBatchSampler(len(train_data), cfg.block_size, cfg.global_batch_size, cfg.seed)

    # ---- model, teacher, optimizer (same seed on every rank: identical initial state everywhere)
    torch.manual_seed(cfg.seed)
    if resume:
        model = build_model(ckpt).to(rt.device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
    else:
        model = build_student(cfg, rt, train_data)
    if cfg.block_size > model.config.block_size:
        raise UserError(f"--block_size {cfg.block_size} exceeds the model's context {model.config.block_size}")
    distiller = None
    if cfg.distill_model:
        from distill import Distiller, load_teacher

        tdtype = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else \
            ("bfloat16" if rt.device_type == "cuda" else "float32")
        teacher = load_teacher(cfg.teacher_model, rt.device, tdtype, block_size=cfg.block_size)
        distiller = Distiller(teacher, model.config, cfg.hardness_task, cfg.hardness_kldiv,
                              cfg.hardness_squarehead, cfg.distill_temperature, cfg.distill_chunk_size)
    optimizer = configure_optimizer(model, cfg, rt)
    scaler = torch.amp.GradScaler(enabled=rt.dtype == "float16")
    iter_num, best_val, train_seconds, pruned_fraction = 0, float("inf"), 0.0, 0.0
    last_eval_iter, flip, resumes = -1, (0.0, 0.0), []
    if resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        train_seconds, pruned_fraction = ckpt.get("train_seconds", 0.0), ckpt.get("pruned_fraction", 0.0)
        last_eval_iter, flip = ckpt.get("last_eval_iter", iter_num), tuple(ckpt.get("flip", (0.0, 0.0)))
        resumes = ckpt.get("resumes", []) + ([{"iter": iter_num, "changed": changes}] if changes else [])
        rngs = ckpt["rng"]
        set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
        del ckpt
        if rt.master:
            changed = "".join(f", --{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(f"resuming {resumed_from} at iter {iter_num}{changed}")
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout may differ per rank; data does not depend on it
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if rt.ddp:
        # masks are identical on every rank by construction: no need to broadcast buffers each forward
        no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 spelling of broadcast_buffers
                          if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                          else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None, **no_buffer_sync)
    if cfg.prune_schedule != "none" and not resume:
        pruned_fraction = apply_pruning_schedule(raw_model, cfg, 0, pruned_fraction)

    # ---- logging (the first write into out_dir)
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rt.master and cfg.overwrite and not cfg.eval_only:  # --eval_only replaces results.json, nothing else
        clear_run(cfg.out_dir)
    if rt.master and resume:
        trim_metrics(metrics_path, iter_num)  # rows a crash left after the checkpoint are written again
    metrics = open(metrics_path, "a") if rt.master else None
    run = open_wandb(cfg) if (cfg.wandb_logging and rt.master) else None

    def log(row):
        if rt.master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if run is not None:
                run.log(row, step=row["iter"])

    def evaluate_now(should_stop=None):
        val = validation_loss(raw_model, val_data, cfg.batch_size, cfg.eval_iters, rt.device, rt.ctx, rt.rank,
                              rt.world_size, should_stop=should_stop)
        ppl = wikitext_perplexity(raw_model, wikitext, cfg.block_size, cfg.ppl_windows, cfg.batch_size,
                                  rt.device, rt.ctx, rt.rank, rt.world_size, should_stop=should_stop)
        return val, ppl

    def masks_agree(digests):
        if len(set(digests)) > 1:
            raise RuntimeError(f"masks differ between ranks at iter {iter_num}: please report this as a bug")
        return True

    def save(name="ckpt.pt", training_state=True):
        """Every rank sends its RNG state (and mask digest) to rank 0, which writes the checkpoint."""
        gathered = rt.gather((rng_state(), mask_digest(raw_model) if training_state else ""))
        masks_agree([d for _, d in gathered])
        if not rt.master:
            return
        obj = {**model_state(raw_model), "config": asdict(cfg), "git_commit": git_commit(), "iter_num": iter_num,
               "best_val_loss": best_val}
        if not training_state:
            save_checkpoint(obj, os.path.join(cfg.out_dir, name))
            return
        obj.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=[r for r, _ in gathered],
                   train_seconds=train_seconds + time.time() - t_loop, pruned_fraction=pruned_fraction,
                   last_eval_iter=last_eval_iter, flip=list(flip), resumes=resumes,
                   lr=get_lr(iter_num, cfg), srste_lambda=srste_lambda(iter_num, cfg.srste_decay, cfg.increase_step))
        save_training_checkpoint(obj, cfg.out_dir, cfg.keep_checkpoints)

    def finish(val, ppl):
        agree = masks_agree(rt.gather(mask_digest(raw_model)))
        result = {"world_size": rt.world_size, "masks_identical_across_ranks": agree, "iter": iter_num,
                  "tokens": iter_num * cfg.global_batch_size * cfg.block_size,
                  "val_loss": val, "wikitext_ppl": ppl, "best_val_loss": best_val, "ppl_windows": cfg.ppl_windows,
                  "train_seconds": round(train_seconds + time.time() - t_loop, 2),
                  **sparsity_report(raw_model), "config": asdict(cfg), "resumes": resumes}
        if rt.master:
            write_json(os.path.join(cfg.out_dir, "results.json"), result)
        return result

    t_loop = time.time()
    if cfg.eval_only:
        val, ppl = evaluate_now()
        if rt.master:
            print(f"eval: val loss {val:.4f}, wikitext-2 ppl {ppl:.2f}")
        return finish(val, ppl)

    # ---- signals: say at once what happens, finish the step, save, exit with code 3 (see StopRequests)
    stop = StopRequests(rt, ckpt_path)
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    if rt.master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{rt.world_size} rank(s) on {rt.device} ({rt.dtype}), {n_params / 1e6:.2f}M parameters, "
              f"{len(sparse_layers(raw_model))} sparse layers, grad accumulation {accum}, "
              f"{cfg.global_batch_size * cfg.block_size:,} tokens per step")
    bar = None
    if rt.master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_iters, initial=iter_num, desc="train", dynamic_ncols=True)
    say = bar.write if bar is not None else print

    t_log, steps_since_log = time.time(), 0
    val = ppl = None
    try:
        while True:
            if stop.requested():  # the state is consistent here: save it and exit
                stop.saving = True
                save()
                raise Interrupted(f"stopped by {stop.name} at iter {iter_num}: {ckpt_path} saved; continue with "
                                  f"the same flags and --init_from resume")
            # ---- evaluate and checkpoint (before the step; never twice at the same iteration)
            if (iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters) and iter_num != last_eval_iter:
                try:
                    val, ppl = evaluate_now(should_stop=stop.drop_evaluation)
                except EvaluationDropped:
                    continue
                last_eval_iter = iter_num
                improved = val < best_val
                best_val = min(best_val, val)
                log({"iter": iter_num, "val_loss": val, "wikitext_ppl": ppl})
                if rt.master:
                    say(f"iter {iter_num}: val loss {val:.4f}, wikitext-2 ppl {ppl:.2f}")
                if iter_num > 0 and improved:  # before ckpt.pt: a checkpoint at iter N implies best.pt is current
                    save("best.pt", training_state=False)
                if 0 < iter_num < cfg.max_iters and (improved or cfg.always_save_checkpoint):
                    save()  # the final one is written after the loop
            if iter_num >= cfg.max_iters:
                break

            # ---- one optimizer step
            if not rt.ddp:  # a step dropped by a second signal saves the RNG state from before it
                step_rng = rng_state()
            lr = get_lr(iter_num, cfg)
            lam = srste_lambda(iter_num, cfg.srste_decay, cfg.increase_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["srste_lambda"] = lam
            loss_sum = torch.zeros((), device=rt.device)
            part_sums = {}
            batches = micro_batches(train_data, sampler, iter_num, rt.rank, rt.world_size, cfg.batch_size,
                                    rt.device)
            dropped = False
            for micro_step, (x, y) in enumerate(batches):
                if stop.drop_step():
                    dropped = True
                    break
                last = micro_step == accum - 1
                # DDP: synchronise gradients on the last micro-step only; no_sync must cover the forward too
                sync = contextlib.nullcontext() if (last or not rt.ddp) else model.no_sync()
                with sync:
                    with rt.ctx:
                        if distiller is not None:
                            loss, parts = distiller(model, x, y)
                        else:
                            _, loss = model(x, targets=y, return_logits=False)  # fused lm_head + CE
                            parts = {}
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach() / accum
                for k, v in parts.items():
                    part_sums[k] = part_sums.get(k, 0.0) + v.float() / accum
            if dropped:  # as if the step had not started: no gradients, the RNG state from before it
                optimizer.zero_grad(set_to_none=True)
                set_rng_state(step_rng)
                continue
            if cfg.grad_clip > 0 or rt.dtype != "float16":
                scaler.unscale_(optimizer)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
                if rt.dtype != "float16" and not torch.isfinite(grad_norm):
                    raise TrainingDiverged(f"non-finite gradient at iter {iter_num} (loss {loss_sum.item():.4g})")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            steps_since_log += 1
            if bar is not None:
                bar.update(1)

            # ---- masks: recompute from the updated weights (identical on every rank: weights are)
            if cfg.mode == "sparse_forward":
                if cfg.prune_schedule != "none":
                    pruned_fraction = apply_pruning_schedule(raw_model, cfg, iter_num, pruned_fraction, optimizer)
                elif cfg.change_mask and iter_num % cfg.mask_update_interval == 0:
                    flip = update_masks(raw_model)
                    log({"iter": iter_num, "flip_ratio": flip[0], "flip_ratio_init": flip[1]})

            # ---- log
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                loss_val = rt.all_reduce_mean(loss_sum).item()
                parts = {k: rt.all_reduce_mean(v.clone()).item() for k, v in sorted(part_sums.items())}
                if not math.isfinite(loss_val):
                    raise TrainingDiverged(f"non-finite loss {loss_val} at iter {iter_num}")
                dt = (time.time() - t_log) / steps_since_log
                t_log, steps_since_log = time.time(), 0
                tok_s = cfg.global_batch_size * cfg.block_size / dt
                row = {"iter": iter_num, "loss": loss_val, "lr": lr, "lambda": lam, "flip_ratio": flip[0],
                       "flip_ratio_init": flip[1], "ms_per_iter": dt * 1000, "tokens_per_s": tok_s,
                       **({"pruned_fraction": pruned_fraction} if cfg.prune_schedule != "none" else {}), **parts}
                log(row)
                if rt.master:
                    extra = "".join(f", {k} {v:.4f}" for k, v in parts.items())
                    say(f"iter {iter_num}: loss {loss_val:.4f}{extra}, lr {lr:.2e}, lambda {lam:.2e}, "
                        f"flip {flip[0]:.4f}, {dt * 1000:.0f} ms/iter, {tok_s:,.0f} tok/s")
    except TrainingDiverged as e:
        raise UserError(f"{e}: training stopped, the last good checkpoint ({ckpt_path}) is kept; lower "
                        f"--learning_rate or check the data") from None
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if metrics is not None:
            metrics.close()
        if run is not None:
            run.finish()
    save()
    if val is None:  # resumed a run that had already finished: report it again
        val, ppl = evaluate_now()
    return finish(val, ppl)


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
