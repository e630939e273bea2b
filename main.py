"""Train a student (GPT-2, OPT, LLaMA, Mistral, Qwen2) into an N:M sparse model (Adaptive Sparse Training), on
one process or under torchrun.

    python main.py --config configs/cpu_tiny.py
    torchrun --nproc_per_node=8 main.py --config ast_naive --student_model gpt2 --teacher_model gpt2
    torchrun --nproc_per_node=8 main.py --config ast_boosted --student_model opt-125m --teacher_model opt-125m \
        --block_size 2048 --data_dir data/c4_opt --wikitext_dir data/wikitext_opt

Every flag lives in config.py (`python main.py --help`). train() below reads top to bottom as one
optimizer step: LR and λ for the step, micro-batches with gradient accumulation (DDP syncs only on the last,
forward and backward both inside no_sync), clip, optimizer step, then the mask recompute, logging, evaluation
and checkpoints.
"""
import contextlib
import dataclasses
import inspect
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import families
from checkpoint import (build_model, git_commit, load_checkpoint, load_model, model_state, rng_state,
                        save_checkpoint, set_rng_state, tokenizer_info)
from cli import UserError
from config import TrainConfig, explicit_keys, help_text, parse_config
from data.loader import (BinDataset, GlobalBatchSampler, check_tokenizer, check_wikitext, load_calibration,
                         load_wikitext_tokens, micro_batches)
from evaluate import sparsity_report, validation_loss, wikitext_perplexity
from model import GPT, GPTConfig, resolve_model_path
from sparsity import (SRSTEAdamW, magnitude_scores, partial_nm_mask, pruning_fraction, sparse_layers, sparsify,
                      srste_lambda, update_masks)

PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingDiverged(Exception):
    pass


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

    def all_ranks_equal(self, t) -> bool:
        """True if tensor t is identical on every rank."""
        if not self.ddp:
            return True
        gathered = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(gathered, t)
        return all(torch.equal(g, t) for g in gathered)

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


def calibration_tokens(cfg: TrainConfig, train: BinDataset, model):
    """Wanda calibration windows: the file from prepare_calibration_data.py, or seeded windows of train.bin."""
    if cfg.calibration:
        tokens, meta = load_calibration(cfg.calibration)
        check_tokenizer(meta, model, cfg.calibration)
        return tokens[:, :cfg.block_size]
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.randint(0, len(train) - cfg.block_size, (cfg.calib_nsamples,), generator=gen)
    return train.get_batch(offsets.numpy())[0]


def load_student(cfg: TrainConfig):
    """The starting model, through the one loader: a checkpoint, an export or a Hugging Face folder (any family)."""
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout))
    if cfg.init_from and not os.path.exists(resolve_model_path(cfg.init_from)):
        raise UserError(f"--init_from {cfg.init_from!r} is none of: resume, scratch, an existing checkpoint "
                        f"file, an export or Hugging Face model folder")
    return load_model(cfg.init_from or cfg.student_model, block_size=cfg.block_size,
                      what="--init_from" if cfg.init_from else "--student_model")


def adopt_sparsity(model, cfg: TrainConfig, explicit) -> TrainConfig:
    """A sparse starting point (a checkpoint or an export) keeps its layers, masks and SLoRB exactly: the config
    takes their settings, so what the run records is what it trains; a flag the user set to something else stops."""
    layer = sparse_layers(model)[0][1]
    have = {"mode": "sparse_forward", "prune_schedule": "none", "mask_type": layer.mask_type,
            "mask_metric": layer.metric, "SLoRB": bool(layer.slorb_k)}
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
                     ste=not hard, calibrate=calib, init_masks=not hard)
        except ValueError as e:  # a pattern or SLoRB k that does not fit the model's widths
            raise UserError(str(e)) from None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model.to(rt.device), cfg


def configure_optimizer(model, cfg: TrainConfig, rt: Runtime):
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
def apply_pruning_schedule(model, cfg: TrainConfig, step: int, current: float) -> float:
    """GMP/IMP: prune the scheduled fraction of the N:M-pruned weights by magnitude; pruned stay pruned."""
    fraction = pruning_fraction(step, cfg.prune_schedule, cfg.prune_start, cfg.prune_end, cfg.prune_rounds)
    due = cfg.prune_schedule == "iterative" or step % cfg.mask_update_interval == 0 or step >= cfg.prune_end
    if fraction == current or not due:
        return current
    for _, layer in sparse_layers(model):
        # scores of the effective weight: already pruned weights score 0 and can never come back
        layer.update_mask(partial_nm_mask(magnitude_scores(layer.weight * layer.mask), layer.n, layer.m, fraction))
        layer.weight.mul_(layer.mask)
    return fraction


def mask_fingerprint(model, device) -> torch.Tensor:
    """Per sparse layer: number of kept weights and the sum of their flat positions (cheap to compare)."""
    rows = [torch.stack([layer.mask.sum(), layer.mask.flatten().nonzero().sum()]).double()
            for _, layer in sparse_layers(model)]
    return torch.stack(rows).to(device) if rows else torch.zeros(1, 2, dtype=torch.float64, device=device)


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
    if int(os.environ.get("RANK", 0)) == 0:  # a log starts with what made it
        print(f"command: {shlex.join([os.path.basename(sys.executable), 'main.py', *argv])}")
        print(f"config: {json.dumps(asdict(cfg))}", flush=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rt = Runtime(cfg)
    try:
        return train(cfg, rt, explicit_keys(argv))
    finally:
        if rt.ddp and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, rt: Runtime, explicit=frozenset()):
    resume = cfg.init_from == "resume"
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if resume and not os.path.isfile(ckpt_path):
        raise UserError(f"--init_from resume but {ckpt_path} does not exist: check --out_dir")
    ckpt = load_checkpoint(ckpt_path) if resume else None

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
        train_data.check_model(model)
        model.gradient_checkpointing = cfg.gradient_checkpointing
    else:
        model, cfg = build_student(cfg, explicit, rt, train_data)
    if cfg.block_size > model.config.block_size:
        raise UserError(f"--block_size {cfg.block_size} exceeds the model's context {model.config.block_size}")
    val_data.check_model(model)
    check_wikitext(cfg.wikitext_dir, wikitext, model)
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
        distiller = Distiller(teacher, model.config, cfg.hardness_task, cfg.hardness_kldiv,
                              cfg.hardness_squarehead, cfg.distill_temperature, cfg.distill_chunk_size)
    optimizer = configure_optimizer(model, cfg, rt)
    scaler = torch.amp.GradScaler(enabled=rt.dtype == "float16")
    iter_num, best_val, train_seconds, pruned_fraction = 0, float("inf"), 0.0, 0.0
    if resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        train_seconds, pruned_fraction = ckpt.get("train_seconds", 0.0), ckpt.get("pruned_fraction", 0.0)
        rngs = ckpt["rng"]
        set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
        del ckpt
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

    # ---- logging
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if rt.master else None
    run = open_wandb(cfg) if (cfg.wandb_logging and rt.master) else None

    def log(row):
        if rt.master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if run is not None:
                run.log(row, step=row["iter"])

    final_iters = cfg.final_eval_iters or cfg.eval_iters
    final_windows = cfg.ppl_windows if cfg.final_ppl_windows == -1 else cfg.final_ppl_windows
    final_differs = (final_iters, final_windows) != (cfg.eval_iters, cfg.ppl_windows)

    def evaluate_now(eval_iters=cfg.eval_iters, windows=cfg.ppl_windows):
        val = validation_loss(raw_model, val_data, cfg.batch_size, eval_iters, rt.device, rt.ctx, rt.rank,
                              rt.world_size)
        ppl = wikitext_perplexity(raw_model, wikitext, cfg.block_size, windows, cfg.batch_size,
                                  rt.device, rt.ctx, rt.rank, rt.world_size)
        return val, ppl

    def evaluate_final():
        """The evaluation results.json reports: --final_eval_iters / --final_ppl_windows (default: as the others)."""
        val, ppl = evaluate_now(final_iters, final_windows)
        if final_differs:
            log({"iter": iter_num, "final_val_loss": val, "final_wikitext_ppl": ppl})
            if rt.master:
                print(f"iter {iter_num}: final evaluation ({final_iters} C4 batches, "
                      f"{final_windows or 'all'} WikiText-2 windows): val loss {val:.4f}, wikitext-2 ppl {ppl:.2f}")
        return val, ppl

    def save(name="ckpt.pt", training_state=True):
        rngs = [rng_state()]
        if rt.ddp:
            rngs = [None] * rt.world_size
            dist.all_gather_object(rngs, rng_state())
        if not rt.master:
            return
        obj = {**model_state(raw_model), "config": asdict(cfg), "git_commit": git_commit(), "iter_num": iter_num,
               "best_val_loss": best_val}
        if training_state:
            obj.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rngs,
                       train_seconds=train_seconds + time.time() - t_loop, pruned_fraction=pruned_fraction,
                       lr=get_lr(iter_num, cfg), srste_lambda=srste_lambda(iter_num, cfg.srste_decay,
                                                                            cfg.increase_step))
        save_checkpoint(obj, os.path.join(cfg.out_dir, name))

    def finish(val, ppl):
        agree = rt.all_ranks_equal(mask_fingerprint(raw_model, rt.device))
        if not agree:
            raise RuntimeError("masks differ between ranks: please report this as a bug")
        result = {"world_size": rt.world_size, "masks_identical_across_ranks": agree, "iter": iter_num,
                  "tokens": iter_num * cfg.global_batch_size * cfg.block_size,
                  "val_loss": val, "wikitext_ppl": ppl, "best_val_loss": best_val, "ppl_windows": final_windows,
                  "eval_iters": final_iters,
                  "train_seconds": round(train_seconds + time.time() - t_loop, 2),
                  **sparsity_report(raw_model), "config": asdict(cfg)}
        if rt.master:
            with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
                json.dump(result, f, indent=2)
        return result

    t_loop = time.time()
    if cfg.eval_only:
        val, ppl = evaluate_final()
        if rt.master:
            print(f"eval: val loss {val:.4f}, wikitext-2 ppl {ppl:.2f}")
        return finish(val, ppl)

    # ---- signals: finish the current step, save, exit cleanly
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
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

    flip = (0.0, 0.0)
    last_eval_iter = iter_num if resume else -1
    t_log, steps_since_log = time.time(), 0
    val = ppl = None
    try:
        while True:
            # ---- evaluate and checkpoint (before the step; never twice at the same iteration)
            if (iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters) and iter_num != last_eval_iter:
                val, ppl = evaluate_now()
                last_eval_iter = iter_num
                improved = val < best_val
                best_val = min(best_val, val)
                log({"iter": iter_num, "val_loss": val, "wikitext_ppl": ppl})
                if rt.master:
                    say(f"iter {iter_num}: val loss {val:.4f}, wikitext-2 ppl {ppl:.2f}")
                if 0 < iter_num < cfg.max_iters and (improved or cfg.always_save_checkpoint):
                    save()  # the final one is written after the loop
                if iter_num > 0 and improved:
                    save("best.pt", training_state=False)
            if iter_num >= cfg.max_iters:
                if final_differs:
                    val, ppl = evaluate_final()
                break

            # ---- one optimizer step
            lr = get_lr(iter_num, cfg)
            lam = srste_lambda(iter_num, cfg.srste_decay, cfg.increase_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["srste_lambda"] = lam
            loss_sum = torch.zeros((), device=rt.device)
            part_sums = {}
            batches = micro_batches(train_data, sampler, iter_num, rt.rank, rt.world_size, cfg.batch_size,
                                    rt.device)
            for micro_step, (x, y) in enumerate(batches):
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
                    pruned_fraction = apply_pruning_schedule(raw_model, cfg, iter_num, pruned_fraction)
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
                # flip ratios where masks are selected by score (a dense run has none; GMP/IMP masks change by
                # pruning, their pruned fraction says how far)
                reselected = cfg.mode == "sparse_forward" and cfg.prune_schedule == "none"
                row = {"iter": iter_num, "loss": loss_val, "lr": lr, "lambda": lam,
                       **({"flip_ratio": flip[0], "flip_ratio_init": flip[1]} if reselected else {}),
                       "ms_per_iter": dt * 1000, "tokens_per_s": tok_s,
                       **({"pruned_fraction": pruned_fraction} if cfg.prune_schedule != "none" else {}), **parts}
                log(row)
                if rt.master:
                    extra = "".join(f", {k} {v:.4f}" for k, v in parts.items())
                    say(f"iter {iter_num}: loss {loss_val:.4f}{extra}, lr {lr:.2e}, lambda {lam:.2e}, "
                        f"flip {flip[0]:.4f}, {dt * 1000:.0f} ms/iter, {tok_s:,.0f} tok/s")

            if rt.any_rank(stop["signal"] is not None):
                save()
                if rt.master:
                    say(f"stopped by signal at iter {iter_num}; checkpoint saved to {ckpt_path}, "
                        f"continue with the same flags and --init_from resume")
                return None
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
        val, ppl = evaluate_final()
    return finish(val, ppl)


if __name__ == "__main__":
    cli.run(main)
