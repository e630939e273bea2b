"""What every bench.py section shares: a training-step variant and its trainer (main.py's step on any model), and
interleaved timing with paired ratios and whole-range verdicts (see bench.py's docstring for the method).

Kept apart from bench.py so that the sections in modules of their own (bench_real.py) use the same trainer and
the same timing without importing bench.py back.
"""
import contextlib
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch


# ------------------------------------------------------------------------------------------------ one step
@dataclass(frozen=True)
class Variant:
    """What one training step does on top of the dense model."""
    label: str
    sparse: bool = False        # 2:4 masks, magnitude, straight-through estimator
    srste: bool = False         # SRSTEAdamW, the paper's variant, λ = 1e-4 (the published srste_decay)
    slorb: str = "none"         # none | fixed | trainable (SLoRB k = 16, mean init)
    distill: bool = False       # frozen dense teacher, loss 0.33 CE + 0.67 KL (τ = 2)
    distill_chunks: int = 0     # the distillation loss in this many token chunks (0: main.py's auto chunk size)
    logits_loss: bool = False   # lm_head + F.cross_entropy on full logits instead of main.py's fused loss
    teacher_dtype: str = "auto"  # main.py's --teacher_dtype: auto = bfloat16 on GPUs, float32 on CPU
    target: float = None        # the ceiling on the ratio to the dense step (gpt2 preset)


def train_config(variant: Variant, block_size: int, batch_size: int):
    """The main.py configuration this variant corresponds to (learning rate, betas, clip, hardness, ...)."""
    from config import TrainConfig
    tokens = batch_size * block_size
    # without SR-STE, torch's AdamW (--optimizer adamw); the distillation weights of the paper's AST command
    return TrainConfig(mode="sparse_forward" if variant.sparse else "dense", mask_metric="magnitude",
                       srste_decay=1e-4 if variant.srste else 0.0, optimizer="ast" if variant.srste else "adamw",
                       hardness_task=0.33, hardness_kldiv=0.67, hardness_squarehead=0.0,
                       SLoRB=variant.slorb != "none", SLoRB_k=16, SLoRB_init_type="mean",
                       trainable_projection=variant.slorb == "trainable", distill_model=variant.distill,
                       distill_chunk_size=max(tokens // variant.distill_chunks, 1) if variant.distill_chunks else 0,
                       teacher_dtype=variant.teacher_dtype,
                       block_size=block_size, batch_size=batch_size, global_batch_size=batch_size)


def teacher_dtype(variant: Variant, device) -> str:
    """main.py's choice: --teacher_dtype, where auto = bfloat16 on GPUs and float32 on CPU."""
    if variant.teacher_dtype != "auto":
        return variant.teacher_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


class Trainer:
    """One variant on a given dense model: its optimizer, objective and a fixed batch; step() is one main.py
    training step.

    Built as main.py builds it (sparsify with the family's filter, configure_optimizer, Distiller). The teacher
    (a distill.Teacher) is needed when the variant distils; the batch is random tokens of the model's vocabulary,
    drawn from `seed`.
    """

    def __init__(self, model, variant: Variant, cfg, device="cpu", dtype="float32", gradient_checkpointing=False,
                 teacher=None, seed=0):
        import families
        from distill import Distiller
        from main import configure_optimizer
        from parallelize import PTDTYPE
        from sparsity import sparsify

        self.variant, self.device, self.cfg = variant, device, cfg
        model = model.to(device)
        if variant.sparse:
            sparsify(model, n=cfg.N, m=cfg.M, metric=cfg.mask_metric, filter_fn=families.sparse_filter(model),
                     slorb_k=cfg.SLoRB_k if cfg.SLoRB else 0, slorb_init=cfg.SLoRB_init_type,
                     trainable_projection=cfg.trainable_projection)
        model.gradient_checkpointing = gradient_checkpointing
        self.model = model.train()
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.optimizer = configure_optimizer(model, cfg, SimpleNamespace(device_type=device_type))
        self.distiller = None
        if variant.distill:
            if teacher is None:
                raise ValueError(f"the {variant.label} variant distils: pass its teacher")
            self.distiller = Distiller(teacher, model.config, cfg.hardness_task, cfg.hardness_kldiv,
                                       cfg.hardness_squarehead, cfg.distill_temperature, cfg.distill_chunk_size)
        self.ctx = contextlib.nullcontext() if dtype == "float32" else \
            torch.autocast(device_type=device_type, dtype=PTDTYPE[dtype])
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(model.config.vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=gen)
        self.x, self.y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step(self):
        """Forward, backward, clip, optimizer step, zero_grad: main.py's step at one micro-batch per step."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate
            group["srste_lambda"] = cfg.srste_decay
        with self.ctx:
            if self.distiller is not None:
                loss, _ = self.distiller(self.model, self.x, self.y)
            else:
                _, loss = self.model(self.x, targets=self.y, return_logits=self.variant.logits_loss)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            raise RuntimeError(f"non-finite gradient in the {self.variant.label} benchmark step")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


# ------------------------------------------------------------------------------------------------ timing
def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, warmup: int, device="cpu", setup=None) -> dict:
    """{name: [seconds per timed round]}: every round calls each fn once, alternating the order each round.

    setup: {name: fn()} whose result fns[name] is called with, made before the clock starts (e.g. a fresh copy
    of a model that the timed call changes)."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            arg = (setup[name](),) if setup and name in setup else ()
            synchronize(device)
            t0 = time.perf_counter()
            fns[name](*arg)
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def time_stats(seconds):
    return dict(median_s=round(statistics.median(seconds), 4), min_s=round(min(seconds), 4),
                max_s=round(max(seconds), 4))


def paired_ratio(seconds, baseline, prefix="ratio"):
    """Median and min–max over rounds of seconds[i] / baseline[i] (both timed in round i)."""
    ratios = [s / b for s, b in zip(seconds, baseline)]
    return {prefix: round(statistics.median(ratios), 3), f"{prefix}_min": round(min(ratios), 3),
            f"{prefix}_max": round(max(ratios), 3)}


def verdict(low, high, target):
    """Met only when every round's ratio is at or below the target (its min–max over rounds: low, high), not met
    when every round's is above; otherwise the rounds disagree and the run does not decide it."""
    if target is None:
        return ""
    if high <= target:
        return "yes"
    return "NO" if low > target else "undecided"
