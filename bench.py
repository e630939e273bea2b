"""Benchmarks: `python bench.py --preset tiny|small|gpt2|smollm2 [--only SECTION,...] [--device cpu|cuda] [--threads N]`.

Other flags: --variants (the training-step variants), --prune_methods (the prune section's rows), --repeats /
--warmup (the preset's by default), --out FILE.
The prune section (prune.py's methods on a random OPT of the preset's shape) runs only when named in --only.
The real-shape presets (smollm2: SmolLM2-135M's LLaMA shapes; tiny-llama) run bench_real.py's sections instead.

Every compared figure is a ratio against a baseline measured in the same run, interleaved: each repeat round
runs every variant once (A B C …, the next round C B A …, so a slow drift of the machine hits all variants
alike), warm-up rounds are dropped, and a ratio is the median over rounds of (variant / baseline of the same
round), shown with its min–max. On a shared 2-core machine absolute seconds drift by tens of percent between
minutes; neighbours in time much less.

Presets are random-weight GPT-2 models (no pretrained weights are needed to time them): `tiny` (2 × 64,
block 64, seconds, one thread; the test runs it), `small` (6 × 384, block 256, batch 2) and `gpt2` (GPT-2 124M
shapes at block 1024, batch 1). Each variant's model is built once and kept while a later section needs it.
Memory is measured in a fresh process per variant; the GPU-only sections (bf16 steps, 2:4 sparse matmuls)
return a row saying why they were skipped elsewhere.

A section is a function (args) -> list of row dicts, named in SECTIONS. Rows are printed as one table per
section and saved, with a `meta` entry (preset, device, threads, torch, load average), as JSON
{section: rows} to --out (default out/bench_PRESET_DEVICE.json). BENCHMARKS.md holds the figures and analysis.
"""
import contextlib
import gc
import io
import json
import os
import resource
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

import bench_core
import bench_real
from bench_core import (Variant, interleaved, paired_ratio, synchronize, teacher_dtype,  # noqa: F401 (bench.X too)
                        time_stats, train_config, verdict)
from cli import REPO_ROOT, ArgumentParser, UserError, default_data_root, run

MiB = 2 ** 20
VOCAB_SIZE = 50257  # GPT-2's tokenizer: the lm_head is a large part of every step


# ------------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int        # micro-batch in sequences, the same for every variant
    repeats: int           # timed rounds (after the warm-up rounds)
    warmup: int
    eval_windows: int      # WikiText-2 windows per timed evaluation
    prepare_inputs: str    # "c4_head": 300 documents of the C4 train head; "all": every shared web-text sample
    distill_seq_len: int   # tokens of the distill_memory section (1024 = the published setting)
    threads: int = 0       # torch CPU threads unless --threads says otherwise (0 = torch's default)
    prune_windows: int = 8  # calibration windows (of block_size tokens) of the prune section


PRESETS = {
    "tiny": Preset(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2, repeats=5, warmup=1,
                   eval_windows=4, prepare_inputs="c4_head", distill_seq_len=256, threads=1,
                   prune_windows=4),
    "small": Preset(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=2, repeats=7, warmup=1,
                    eval_windows=4, prepare_inputs="all", distill_seq_len=1024),
    "gpt2": Preset(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=1, repeats=5, warmup=1,
                   eval_windows=2, prepare_inputs="all", distill_seq_len=1024),
    # GPU shapes (scripts/gpu_check.sh): GPT-2-XL, 1.5B
    "gpt2-xl": Preset(n_layer=48, n_head=25, n_embd=1600, block_size=1024, batch_size=1, repeats=3, warmup=1,
                      eval_windows=2, prepare_inputs="c4_head", distill_seq_len=1024),
}


STEP_VARIANTS = {
    "dense": Variant("dense GPT-2, torch AdamW"),
    "masks": Variant("2:4 masks (STE), torch AdamW", sparse=True, target=1.03),
    "masks+srste": Variant("+ SR-STE AdamW (paper variant)", sparse=True, srste=True),
    "masks+srste+slorb": Variant("+ SLoRB k=16, fixed projection", sparse=True, srste=True, slorb="fixed",
                                 target=1.10),
    "masks+srste+slorb_tp": Variant("+ SLoRB k=16, trainable projection", sparse=True, srste=True,
                                    slorb="trainable"),
    "masks+distill": Variant("2:4 masks + distillation (teacher forward, KL)", sparse=True, distill=True),
    "all": Variant("masks + SR-STE + SLoRB (trainable) + distillation", sparse=True, srste=True,
                   slorb="trainable", distill=True, target=1.40),
    "all_one_chunk": Variant("all, distillation loss as one chunk of the whole batch", sparse=True,
                             srste=True, slorb="trainable", distill=True, distill_chunks=1),
    "dense_logits": Variant("dense, full logits + F.cross_entropy (not main.py's fused loss)", logits_loss=True),
    "all_bf16_teacher": Variant("all, teacher held in bf16 (--teacher_dtype bfloat16, the GPU default)",
                                sparse=True, srste=True, slorb="trainable", distill=True,
                                teacher_dtype="bfloat16"),
}

MEMORY_VARIANTS = ("dense", "masks", "all")


def model_config(preset: Preset):
    from model import GPTConfig
    return GPTConfig(block_size=preset.block_size, vocab_size=VOCAB_SIZE, n_layer=preset.n_layer,
                     n_head=preset.n_head, n_embd=preset.n_embd)


# ------------------------------------------------------------------------------------------------ one variant
def build_teacher(preset: Preset, device, dtype="float32", seed=1):
    """A random dense teacher of the student's shape, frozen, in dtype (a distill.TEACHER_DTYPES key)."""
    from distill import TEACHER_DTYPES, Teacher
    from model import GPT
    torch.manual_seed(seed)
    return Teacher(GPT(model_config(preset))).to(device=device, dtype=TEACHER_DTYPES[dtype])


class Trainer(bench_core.Trainer):
    """One variant on the preset's random GPT-2 (the same weights and batch for every variant); the teacher, when
    the variant distils and none is given, another random GPT-2 of its shape."""

    def __init__(self, preset: Preset, variant: Variant, device="cpu", dtype="float32",
                 gradient_checkpointing=False, teacher=None, seed=0):
        from model import GPT

        if variant.distill and teacher is None:
            teacher = build_teacher(preset, device, teacher_dtype(variant, device))
        torch.manual_seed(seed)
        super().__init__(GPT(model_config(preset)), variant, train_config(variant, preset.block_size,
                                                                          preset.batch_size),
                         device, dtype, gradient_checkpointing, teacher, seed)


class Workbench:
    """The run's trainers, each built once on first use and kept (the frozen teachers are shared)."""

    def __init__(self, args):
        self.args = args
        self.trainers = {}
        self.teachers = {}

    def trainer(self, name, dtype="float32") -> Trainer:
        key = (name, dtype)
        if key not in self.trainers:
            variant = STEP_VARIANTS[name]
            teacher = None
            if variant.distill:
                t_dtype = teacher_dtype(variant, self.args.device)
                if t_dtype not in self.teachers:
                    self.teachers[t_dtype] = build_teacher(self.args.preset, self.args.device, t_dtype)
                teacher = self.teachers[t_dtype]
            self.trainers[key] = Trainer(self.args.preset, variant, self.args.device, dtype, teacher=teacher)
        return self.trainers[key]

    def keep_only(self, names):
        """Free the trainers (and teachers) no later section needs: a gpt2-sized one holds about 2 GB."""
        self.trainers = {key: t for key, t in self.trainers.items() if key[0] in names}
        used = {id(t.distiller.teacher) for t in self.trainers.values() if t.distiller is not None}
        self.teachers = {dtype: t for dtype, t in self.teachers.items() if id(t) in used}
        gc.collect()


# ------------------------------------------------------------------------------------------------ sections
def _train_step_rows(args, dtype):
    names = args.variants
    trainers = {name: args.bench.trainer(name, dtype) for name in names}
    times = interleaved({name: t.step for name, t in trainers.items()}, args.repeats, args.warmup, args.device)
    rows = []
    for name in names:
        v = STEP_VARIANTS[name]
        row = dict(variant=name, what=v.label, dtype=dtype, **time_stats(times[name]),
                   **paired_ratio(times[name], times["dense"]))
        row.update(target=v.target if v.target is not None else "",
                   met=verdict(row["ratio_min"], row["ratio_max"], v.target))
        rows.append(row)
    return rows


def train_step(args):
    """One full training step per variant (forward, backward, clip, optimizer), as a ratio to the dense step."""
    return _train_step_rows(args, "float32")


def train_step_bf16(args):
    """GPU only: the same steps under bf16 autocast (fp32 master weights, bf16 teacher), as main.py trains."""
    if not args.device.startswith("cuda"):
        return [dict(skipped="needs --device cuda: bf16 autocast (fp32 master weights, bf16 teacher) is how "
                             "main.py trains on GPUs; on CPU it trains in fp32")]
    return _train_step_rows(args, "bfloat16")


def components(args):
    """What each addition costs on its own, interleaved with the dense step and as a fraction of it: the
    optimizers on the same gradients, the forward weight of every sparse layer (W ⊙ M, + SLoRB's ΔW) forward
    and backward, the teacher's blocks, and the training loss alone on fixed features (CE vs the teacher's
    lm_head + 0.33 CE + 0.67 KL), forward and backward. The step variants' ratios are about 1 + the sum of their
    parts (less where a part overlaps what the dense step already pays)."""
    from loss import cross_entropy, lm_head_loss
    from sparsity import sparse_layers

    b = args.bench
    dense, masks, srste = b.trainer("dense"), b.trainer("masks"), b.trainer("masks+srste")
    distilled = b.trainer("masks+distill")
    teacher, cfg = distilled.distiller.teacher, distilled.cfg

    # the two optimizers step the same model shapes on the same (shared, random) gradients
    for p_a, p_b in zip(masks.model.parameters(), srste.model.parameters()):
        p_a.grad = p_b.grad = torch.randn_like(p_a) * 1e-3
    for group in srste.optimizer.param_groups:
        group["srste_lambda"] = srste.cfg.srste_decay

    # the forward weights of other trainers' models than the two above, whose gradients must stay put
    weight_models = {"masks": distilled.model, "fixed": b.trainer("masks+srste+slorb").model,
                     "trainable": b.trainer("masks+srste+slorb_tp").model}

    def forward_weights(kind, backward=True):
        layers = [layer for _, layer in sparse_layers(weight_models[kind])]
        grads = [torch.randn_like(layer.weight) for layer in layers] if backward else None

        def run():
            if not backward:
                with torch.no_grad():
                    for layer in layers:
                        layer.forward_weight()
                return
            for layer, g in zip(layers, grads):  # gradients accumulate into .grad, as in a step
                layer.forward_weight().backward(g)
        return run

    with torch.no_grad():
        feats = dense.model(dense.x, features_only=True).flatten(0, 1)
        t_feats = teacher(dense.x, features_only=True).flatten(0, 1)
    head, y = dense.model.lm_head.weight, dense.y.flatten()

    def teacher_blocks():
        with torch.no_grad():
            teacher(dense.x, features_only=True)

    def loss(distil):
        def run():
            f, h = feats.detach().requires_grad_(), head.detach().requires_grad_()
            with dense.ctx:
                if distil:  # what the Distiller does
                    total, _, _ = lm_head_loss(f, h, y, teacher_x=t_feats, teacher_weight=teacher.lm_head.weight,
                                               temperature=cfg.distill_temperature, w_ce=cfg.hardness_task,
                                               w_kl=cfg.hardness_kldiv, chunk_size=cfg.distill_chunk_size)
                else:  # what GPT.forward does with targets
                    total = cross_entropy(f, h, y)
            total.backward()
        return run

    parts = {
        "dense training step": (dense.step, "the baseline"),
        "optimizer: torch AdamW": (masks.optimizer.step, "dense, masks"),
        "optimizer: SRSTEAdamW (paper, λ = 1e-4)": (srste.optimizer.step, "+ SR-STE: the difference of the two"),
        "sparse-layer weights W ⊙ M, forward": (forward_weights("masks", backward=False),
                                                "masks (the STE backward passes the gradient through)"),
        "W ⊙ M, forward + backward": (forward_weights("masks"), "the reference of the next two"),
        "W ⊙ M + S X, fixed X, forward + backward": (forward_weights("fixed"), "+ SLoRB fixed: the difference"),
        "W ⊙ M + S X, trainable X, forward + backward": (forward_weights("trainable"),
                                                         "+ SLoRB trainable: the difference"),
        "teacher forward, blocks (features)": (teacher_blocks, "distillation"),
        "loss: lm_head + CE (fwd + bwd)": (loss(False), "every step (the reference of the next)"),
        "loss: lm_head + teacher lm_head + 0.33 CE + 0.67 KL": (loss(True), "distillation: the difference"),
    }
    try:
        times = interleaved({name: fn for name, (fn, _) in parts.items()}, args.repeats, args.warmup, args.device)
    finally:
        for model in (masks.model, srste.model, *weight_models.values()):
            model.zero_grad(set_to_none=True)
    base = times["dense training step"]
    return [dict(part=name, adds_to=adds_to, **time_stats(times[name]), **paired_ratio(times[name], base,
                                                                                        "of_dense_step"))
            for name, (_, adds_to) in parts.items()]


def mask_recompute(args):
    """update_masks() over every sparse layer (magnitude and Wanda), as a ratio to one training step."""
    from sparsity import collect_input_norms, sparse_layers, update_masks

    t = args.bench.trainer("masks")
    layers = [layer for _, layer in sparse_layers(t.model)]
    with collect_input_norms(t.model):  # Wanda's ||X_j|| from one forward of the dense model
        t.model(t.x)

    def recompute(metric):
        for layer in layers:
            layer.metric = metric
        try:
            update_masks(t.model)
        finally:
            for layer in layers:
                layer.metric = "magnitude"

    times = interleaved({"step": t.step, "magnitude": lambda: recompute("magnitude"),
                         "wanda": lambda: recompute("wanda")}, args.repeats, args.warmup, args.device)
    weights = sum(layer.weight.numel() for layer in layers)
    rows = [dict(what="training step (masks variant)", layers=len(layers), weights=weights,
                 **time_stats(times["step"]), ratio_vs_step=1.0)]
    for metric in ("magnitude", "wanda"):
        r = paired_ratio(times[metric], times["step"], "ratio_vs_step")
        rows.append(dict(what=f"update_masks, {metric}", layers=len(layers), weights=weights,
                         **time_stats(times[metric]), **r, target=0.05,
                         met=verdict(r["ratio_vs_step_min"], r["ratio_vs_step_max"], 0.05),
                         amortised_every_10_steps=round(r["ratio_vs_step"] / 10, 4)))
    return rows


PRUNE_METHODS = {  # row -> (prune.py --method, --reconstruct)
    "magnitude": ("magnitude", False), "wanda": ("wanda", False), "sparsegpt": ("sparsegpt", False),
    "wanda+reconstruct": ("wanda", True),
}


def opt_model(preset: Preset, device):
    """A random OPT of the preset's shape (the gpt2 preset: OPT-125M's, 12 blocks x 768, ffn 3072, 12 heads),
    run as prune.py runs it (the transformers model behind families.HFCausalLM)."""
    import families

    torch.manual_seed(0)
    return families.from_config("opt", dict(
        vocab_size=50272, hidden_size=preset.n_embd, word_embed_proj_dim=preset.n_embd,
        num_hidden_layers=preset.n_layer, num_attention_heads=preset.n_head, ffn_dim=4 * preset.n_embd,
        max_position_embeddings=preset.block_size)).to(device).eval()


def prune_timing(args):
    """prune.py's pruning (prune.prune_model, 2:4) per method on a random OPT of the preset's shape, interleaved
    with one dense forward of the same calibration set: each method's seconds per block as a ratio to that whole
    forward (the published code's cost unit). Reconstruction runs prune.py's default epochs and learning rate.
    Loading, evaluation and saving are not timed; each call prunes a fresh copy of the dense model."""
    import copy

    import prune

    p = args.preset
    model = opt_model(p, args.device)
    tokens = torch.randint(50272, (p.prune_windows, p.block_size), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)

    @torch.no_grad()
    def dense_forward():
        for i in range(0, len(tokens), p.batch_size):
            model.features(tokens[i:i + p.batch_size])

    def pruner(method, recon):
        reconstruct = prune.Reconstruction() if recon else None
        return lambda m: prune.prune_model(m, method, tokens=tokens, batch_size=p.batch_size,
                                           reconstruct=reconstruct, progress=False)

    methods = args.prune_methods
    fns = {"dense forward": dense_forward, **{name: pruner(*PRUNE_METHODS[name]) for name in methods}}
    setup = {name: (lambda: copy.deepcopy(model)) for name in methods}
    times = interleaved(fns, args.repeats, args.warmup, args.device, setup=setup)
    blocks = p.n_layer
    common = dict(model=f"OPT, {p.n_layer} x {p.n_embd}", windows=p.prune_windows, window=p.block_size,
                  batch=p.batch_size)
    rows = [dict(what="dense forward of the calibration set", **common, **time_stats(times["dense forward"]))]
    for name in methods:
        per_block = [t / blocks for t in times[name]]
        rows.append(dict(what=name, **common, **time_stats(times[name]),
                         seconds_per_block=round(statistics.median(per_block), 4),
                         **paired_ratio(per_block, times["dense forward"], "per_block_vs_dense_forward")))
    return rows


def measure_step_memory(preset, variant, device="cpu", gradient_checkpointing=False, threads=0,
                        fresh_process=True) -> dict:
    """Memory of one steady-state training step of a variant (the second step: optimizer state exists).

    state_mib: what the trainer holds between steps (weights, masks, optimizer state, teacher), above the
    interpreter with its modules imported; peak_mib: the peak during the step, on the same base; step_mib = peak − state (activations,
    gradients, logits). CPU: resident set size (VmHWM, reset through /proc/self/clear_refs); CUDA:
    max_memory_allocated. fresh_process: measure in a new process (see in_fresh_processes).
    """
    kwargs = dict(preset=preset, variant=variant, device=device, gradient_checkpointing=gradient_checkpointing,
                  threads=threads)
    if fresh_process:
        return in_fresh_processes(measure_step_memory, [dict(kwargs, fresh_process=False)])[0]

    import main  # noqa: F401  every module the trainer needs, imported before the base is taken
    if threads:
        torch.set_num_threads(threads)
    gc.collect()
    base, _ = _start_peak_tracking(device)
    trainer = Trainer(PRESETS[preset], STEP_VARIANTS[variant], device,
                      gradient_checkpointing=gradient_checkpointing)
    trainer.step()  # allocates the optimizer state
    gc.collect()
    before, method = _start_peak_tracking(device)
    trainer.step()
    synchronize(device)
    peak = _peak_since_start(device, method)
    return dict(kwargs, state_mib=round((before - base) / MiB, 1), peak_mib=round((peak - base) / MiB, 1),
                step_mib=round((peak - before) / MiB, 1), method=method)


def _call(fn_and_kwargs):
    fn, kwargs = fn_and_kwargs
    return fn(**kwargs)


def in_fresh_processes(fn, calls, jobs=1):
    """[fn(**kwargs) for kwargs in calls], each call in a process of its own, `jobs` at a time.

    The processes are forked from a server that has only imported torch and the project, so each starts clean
    without paying the imports again (seconds each), and with glibc returning every freed buffer to the OS at
    once, so a process's resident set is what is live.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "main", "distill", "bench"])
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the server when it starts
    try:
        with ctx.Pool(jobs, maxtasksperchild=1) as pool:
            return pool.map(_call, [(fn, kwargs) for kwargs in calls], chunksize=1)
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def memory(args):
    """Peak memory of a training step: dense vs sparse vs distillation, without and with gradient checkpointing,
    each in a fresh process."""
    cases = [(name, ckpt) for name in MEMORY_VARIANTS for ckpt in (False, True)]
    # Each process measures only its own memory, so two can run at once (on CPU; one GPU is shared).
    jobs = 1 if args.device.startswith("cuda") else min(2, os.cpu_count() or 1)
    results = in_fresh_processes(measure_step_memory, [
        dict(preset=args.preset_name, variant=name, device=args.device, gradient_checkpointing=ckpt,
             threads=args.threads, fresh_process=False) for name, ckpt in cases], jobs)
    rows = [dict(variant=name, gradient_checkpointing=ckpt, state_mib=r["state_mib"], step_mib=r["step_mib"],
                 peak_mib=r["peak_mib"], method=r["method"]) for (name, ckpt), r in zip(cases, results)]
    reference = rows[0]["peak_mib"]
    for row in rows:
        row["peak_vs_dense"] = round(row["peak_mib"] / reference, 3)
    return rows


def wikitext_tokens():
    """(tokens, where from): data/wikitext/test.bin, else the shared WikiText-2 tokenised now, else random."""
    from data.loader import load_wikitext_tokens

    prepared = os.path.join(REPO_ROOT, "data", "wikitext")
    if os.path.isfile(os.path.join(prepared, "test.bin")):
        return load_wikitext_tokens(prepared, "test"), "data/wikitext/test.bin"
    shared = os.path.join(default_data_root(), "wikitext2")
    if os.path.isdir(shared):
        from data.wikitext import prepare as wikitext_prepare
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            wikitext_prepare.main(["--input", shared, "--out_dir", tmp])
            return load_wikitext_tokens(tmp, "test"), "shared wikitext2, tokenised now"
    return torch.randint(VOCAB_SIZE, (287644,), generator=torch.Generator().manual_seed(0)), "random tokens"


def eval_throughput(args):
    """WikiText-2 perplexity evaluation (evaluate.wikitext_perplexity) in tokens/s, dense vs 2:4 masks."""
    from evaluate import wikitext_perplexity

    p = args.preset
    tokens, source = wikitext_tokens()
    seq = min(1024, p.block_size)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"  # main.py's autocast choice
    ctx = contextlib.nullcontext() if dtype == "float32" else torch.autocast("cuda", dtype=torch.bfloat16)
    models = {name: args.bench.trainer(name).model for name in ("dense", "masks")}
    fns = {name: (lambda m=m: wikitext_perplexity(m, tokens, p.block_size, p.eval_windows, p.batch_size,
                                                  args.device, ctx))
           for name, m in models.items()}
    times = interleaved(fns, args.repeats, args.warmup, args.device)
    n_tokens = p.eval_windows * seq
    rows = []
    for name in models:
        t = times[name]
        rows.append(dict(model=name, windows=p.eval_windows, window=seq, tokens=n_tokens, dtype=dtype,
                         tokens_per_s=round(n_tokens / statistics.median(t)),
                         tokens_per_s_min=round(n_tokens / max(t)), tokens_per_s_max=round(n_tokens / min(t)),
                         **paired_ratio(t, times["dense"], "time_vs_dense"), source=source))
    return rows


ZEROSHOT_EXAMPLES = {"tiny": 2, "small": 4, "gpt2": 3}  # the first N examples of each of the seven tasks
ZEROSHOT_BATCHES = (1, 4, 16, 64)


def zeroshot_throughput(args):
    """zeroshot.evaluate_model end to end (the harness's task building included) in examples/s on the first
    examples of the seven tasks: the dense model at several batch sizes, the 2:4 one at zeroshot.py's default."""
    import zeroshot

    limit, default = ZEROSHOT_EXAMPLES[args.preset_name], zeroshot.DEFAULT_BATCH_SIZE
    dense, masks = (args.bench.trainer(name).model for name in ("dense", "masks"))
    runs = {f"dense, batch {b}": (dense, b) for b in ZEROSHOT_BATCHES}
    runs[f"2:4 masks, batch {default}"] = (masks, default)
    last = {}

    def call(name):
        model, batch = runs[name]
        last[name] = zeroshot.evaluate_model(model, limit=limit, batch_size=batch, device=args.device)
    times = interleaved({name: (lambda name=name: call(name)) for name in runs}, args.repeats, args.warmup,
                        args.device)
    baseline = f"dense, batch {default}"
    accs = {name: {t: r["acc"] for t, r in z["tasks"].items()} for name, z in last.items()}
    rows = []
    for name, (_, batch) in runs.items():
        z, t = last[name], times[name]
        rows.append(dict(model=name.split(",")[0], batch_size=batch, examples=z["examples"], requests=z["requests"],
                         examples_per_s=round(z["examples"] / statistics.median(t), 2),
                         examples_per_s_min=round(z["examples"] / max(t), 2),
                         examples_per_s_max=round(z["examples"] / min(t), 2),
                         scoring_share=round(z["scoring_seconds"] / z["seconds"], 2),
                         **paired_ratio(t, times[baseline], f"time_vs_batch_{default}"),
                         same_acc_as_baseline=accs[name] == accs[baseline] if name.startswith("dense") else ""))
    return rows


def prepare_inputs(kind):
    """(files, extra prepare.py flags) for the C4 prepare benchmark, or None without the shared data."""
    root = default_data_root()
    head = os.path.join(root, "c4", "en", "c4-train.00000-of-01024.head1000.json.gz")
    if kind == "c4_head":
        return ([head], ["--max_docs", "300"]) if os.path.isfile(head) else None
    import glob  # the same files as data/bench_prepare.py
    files = sorted(glob.glob(os.path.join(root, "c4", "en", "*.json.gz"))
                   + glob.glob(os.path.join(root, "fineweb", "*.json.gz"))
                   + glob.glob(os.path.join(root, "webtext", "*.json.gz")))
    return (files, []) if files else None


def prepare_throughput(args):
    """C4 prepare (data/c4_dataset/prepare.py main: read, tokenise, write, sha256) in tokens/s, 1 vs 2 workers."""
    from data.c4_dataset import prepare
    from data.tokenizer import get_gpt2_encoding

    found = prepare_inputs(args.preset.prepare_inputs)
    if found is None:
        return [dict(skipped=f"no shared web-text samples under {default_data_root()} (set SPARSE_GPT2_DATA)")]
    files, extra = found
    get_gpt2_encoding()  # loaded once, outside the timed runs
    counted = {}

    def prepare_once(num_proc):
        with tempfile.TemporaryDirectory() as out_dir, contextlib.redirect_stdout(io.StringIO()):
            meta = prepare.main([a for f in files for a in ("--input", f)] + extra + [
                "--out_dir", out_dir, "--val_fraction", "0.005", "--num_proc", str(num_proc)])
        counted[num_proc] = sum(s["tokens"] for s in meta["splits"].values())

    procs = (1, 2)
    times = interleaved({n: (lambda n=n: prepare_once(n)) for n in procs}, args.repeats, args.warmup)
    rows = []
    for n in procs:
        t = times[n]
        rows.append(dict(num_proc=n, files=len(files), tokens=counted[n],
                         tokens_per_s=round(counted[n] / statistics.median(t)), **time_stats(t),
                         **paired_ratio(t, times[1], "time_vs_1_proc")))
    return rows


def _top_ops(prof, scope, top, device):
    events = prof.key_averages()
    total_cpu = sum(e.self_cpu_time_total for e in events) or 1.0
    calls = sum(e.count for e in events)
    rows = [dict(scope=scope, op=f"(all {len(events)} ops)", calls=calls,
                 self_cpu_ms=round(total_cpu / 1000, 1), self_cpu_pct=100.0)]
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        row = dict(scope=scope, op=e.key, calls=e.count, self_cpu_ms=round(e.self_cpu_time_total / 1000, 1),
                   self_cpu_pct=round(100 * e.self_cpu_time_total / total_cpu, 1))
        if device.startswith("cuda"):
            row["self_cuda_ms"] = round(getattr(e, "self_device_time_total", 0) / 1000, 1)
        rows.append(row)
    return rows


def profile(args):
    """torch.profiler top operators (self time, calls) of one sparse step, one distillation step and one mask
    recompute: call counts scale with layers and tensors, never with the number of weight groups."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from sparsity import update_masks

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    rows = []
    for name in ("masks+srste+slorb", "all"):
        t = args.bench.trainer(name)
        t.step()  # warm: optimizer state exists, allocator caches filled
        with torch_profile(activities=activities) as prof:
            t.step()
            synchronize(args.device)
        rows += _top_ops(prof, f"train step: {name}", 10, args.device)
    t = args.bench.trainer("masks+srste+slorb")
    with torch_profile(activities=activities) as prof:
        update_masks(t.model)
        synchronize(args.device)
    rows += _top_ops(prof, "update_masks (magnitude, all layers)", 8, args.device)
    return rows


def _gpt2_linears(d):
    return (("attn.c_attn", 3 * d, d), ("attn.c_proj", d, d), ("mlp.c_fc", 4 * d, d), ("mlp.c_proj", d, 4 * d))


SEMI_STRUCTURED_SHAPES = {  # (layer, out, in) of the block linears
    "gpt2": _gpt2_linears(768),
    "gpt2-xl": _gpt2_linears(1600),
    "llama-7b MLP": (("mlp.gate_proj / up_proj", 11008, 4096), ("mlp.down_proj", 4096, 11008)),
}


def semi_structured(args):
    """GPU only: torch.sparse.to_sparse_semi_structured 2:4 weight × many tokens against the dense matmul."""
    if not (args.device.startswith("cuda") and torch.cuda.is_available()):
        return [dict(skipped="needs --device cuda on a GPU with 2:4 sparse tensor cores (compute capability "
                             ">= 8.0)")]
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from sparsity import nm_mask

    tokens = 16384  # 16 sequences of 1024: many tokens, where the sparse kernels pay off
    backends = ["default"] + (["cutlass"] if not SparseSemiStructuredTensor._FORCE_CUTLASS else [])
    rows = []
    for model_name, linears in SEMI_STRUCTURED_SHAPES.items():
        for layer, out_f, in_f in linears:
            for dtype in (torch.bfloat16, torch.float16):
                gen = torch.Generator(device=args.device).manual_seed(0)
                w = torch.randn(out_f, in_f, device=args.device, dtype=dtype, generator=gen)
                w = w * nm_mask(w.float().abs(), 2, 4)
                x = torch.randn(tokens, in_f, device=args.device, dtype=dtype, generator=gen)
                for backend in backends:
                    row = dict(model=model_name, layer=layer, out=out_f, inp=in_f, tokens=tokens,
                               dtype=str(dtype).replace("torch.", ""), backend=backend)
                    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
                    try:
                        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass" or saved
                        ws = to_sparse_semi_structured(w)
                        row["backend"] = type(ws).__name__.replace("SparseSemiStructuredTensor", "")
                        ref = F.linear(x, w)
                        err = (F.linear(x, ws) - ref).abs().max().item() / ref.abs().max().item()
                        times = interleaved({"dense": lambda: _repeat(F.linear, x, w),
                                             "sparse": lambda: _repeat(F.linear, x, ws)},
                                            args.repeats, max(args.warmup, 1), args.device)
                        d_ms = statistics.median(times["dense"]) / 20 * 1000
                        s_ms = statistics.median(times["sparse"]) / 20 * 1000
                        row.update(dense_ms=round(d_ms, 4), sparse_ms=round(s_ms, 4),
                                   dense_tflops=round(2 * tokens * in_f * out_f / d_ms / 1e9, 1),
                                   **paired_ratio(times["dense"], times["sparse"], "speedup"),
                                   rel_err=f"{err:.1e}")
                    except Exception as e:  # an unsupported shape, dtype or backend is a row, not a crash
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    finally:
                        SparseSemiStructuredTensor._FORCE_CUTLASS = saved
                    rows.append(row)
    return rows


def _repeat(fn, *a, n=20):
    for _ in range(n):
        fn(*a)


def measure_loss_peak_memory(chunk_size, batch_size=1, seq_len=1024, vocab_size=50257, n_layer=2, n_head=2,
                             n_embd=64, hardness=(0.33, 0.67, 0.0), device="cpu", fresh_process=True) -> dict:
    """Peak memory (MiB) of one distillation loss forward + backward, above what was in use just before it.

    A tiny model with the full vocabulary makes the logits dominate. On CUDA the allocator's peak statistics
    are exact. On CPU the peak resident set size is used: VmHWM, reset through /proc/self/clear_refs (Linux),
    else ru_maxrss. fresh_process runs the measurement in a new interpreter, so earlier peaks and memory
    cached by the allocator from earlier variants do not count (use it on CPU).
    """
    kwargs = dict(chunk_size=chunk_size, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd, hardness=list(hardness), device=device)
    if fresh_process:
        code = ("import json, sys, bench; "
                "print(json.dumps(bench.measure_loss_peak_memory(**json.loads(sys.argv[1]), fresh_process=False)))")
        # A fixed mmap threshold makes glibc return every freed tensor buffer to the OS at once; otherwise
        # freed chunk-sized buffers linger in the heap and the RSS overstates what is live.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory measurement failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    from distill import Distiller, Teacher, squarehead_loss
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=seq_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    student, teacher = GPT(cfg).to(device), Teacher(GPT(cfg)).to(device)
    h_task, h_kl, h_sq = hardness
    x = torch.randint(vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(vocab_size, (batch_size, seq_len), device=device)
    gc.collect()
    before, method = _start_peak_tracking(device)
    t0 = time.perf_counter()
    if chunk_size is None:  # the reference: full logits and plain autograd through log_softmax
        import torch.nn.functional as F
        logits, _, hidden = student(x, y, return_hidden=True)
        t_feats, t_hidden = teacher(x, features_only=True, return_hidden=True)
        log_s = F.log_softmax(logits.float() / 2.0, -1)
        log_t = F.log_softmax(teacher.lm_head(t_feats).float() / 2.0, -1)
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean() * 4.0
        loss = h_task * F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) + h_kl * kl
        if h_sq:
            loss = loss + h_sq * squarehead_loss(hidden, t_hidden)
    else:
        distiller = Distiller(teacher, cfg, hardness_task=h_task, hardness_kldiv=h_kl, hardness_squarehead=h_sq,
                              chunk_size=chunk_size)
        loss, _ = distiller(student, x, y)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _peak_since_start(device, method)
    return dict(kwargs, peak_mib=round((peak - before) / 2 ** 20, 1), seconds=round(seconds, 3), method=method,
                loss=round(loss.item(), 4))


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _start_peak_tracking(device):
    """(bytes in use now, how the peak will be read)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        return _proc_status_bytes("VmRSS"), "VmHWM"
    except OSError:
        # ru_maxrss cannot be reset: right only if nothing earlier in this process peaked higher.
        return _ru_maxrss_bytes(), "ru_maxrss"


def _peak_since_start(device, method):
    if method == "cuda.max_memory_allocated":
        return torch.cuda.max_memory_allocated()
    if method == "VmHWM":
        return _proc_status_bytes("VmHWM")
    return _ru_maxrss_bytes()


def _ru_maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def distill_memory(args):
    """Peak memory of the distillation loss (B=1, T=1024 (tiny preset: 256), GPT-2 vocabulary; 2 layers × 64
    wide, so the logits dominate), forward + backward, chunked vs the plain full-logits loss; each variant in a
    fresh process."""
    chunk_sizes = (None, 1024, 256, 64)  # None first: the reference the ratios are taken against
    results = in_fresh_processes(measure_loss_peak_memory, [
        dict(chunk_size=c, seq_len=args.preset.distill_seq_len, device=args.device, fresh_process=False)
        for c in chunk_sizes])  # one at a time: the seconds column is a timing
    rows = []
    for chunk_size, r in zip(chunk_sizes, results):
        reference = rows[0]["peak_mib"] if rows else r["peak_mib"]
        rows.append(dict(variant="unchunked" if chunk_size is None else f"chunks of {chunk_size}",
                         B=r["batch_size"], T=r["seq_len"], vocab=r["vocab_size"],
                         one_fp32_logits_mib=round(r["batch_size"] * r["seq_len"] * r["vocab_size"] * 4 / 2 ** 20, 1),
                         peak_mib=r["peak_mib"],
                         ratio_vs_unchunked=round(r["peak_mib"] / reference, 3), seconds=r["seconds"],
                         loss=r["loss"], method=r["method"]))
    return rows


# The trainers each section uses (None: the --variants), so the run frees the others when no later section needs them.
SECTION_TRAINERS = {
    "train_step": None,
    "train_step_bf16": None,
    "components": ("dense", "masks", "masks+srste", "masks+distill", "masks+srste+slorb", "masks+srste+slorb_tp"),
    "mask_recompute": ("masks",),
    "eval_throughput": ("dense", "masks"),
    "zeroshot_throughput": ("dense", "masks"),
    "profile": ("masks+srste+slorb", "all"),
}

# Run order: the fresh-process sections first, before this process holds every variant's model.
SECTIONS = {
    "memory": memory,
    "distill_memory": distill_memory,
    "prepare_throughput": prepare_throughput,
    "train_step": train_step,
    "components": components,
    "mask_recompute": mask_recompute,
    "prune": prune_timing,
    "eval_throughput": eval_throughput,
    "zeroshot_throughput": zeroshot_throughput,
    "profile": profile,
    "train_step_bf16": train_step_bf16,
    "semi_structured": semi_structured,
    "real_step": bench_real.real_step,  # the real-shape presets' sections (smollm2, tiny-llama)
    "real_prune": bench_real.real_prune,
}

# Sections a default run leaves out: prune on the gpt2 preset takes over an hour on a CPU (its reconstruction row).
ON_REQUEST = ("prune", *bench_real.SECTIONS)


# ------------------------------------------------------------------------------------------------ output
def markdown_table(rows):
    """A section's rows as a Markdown table (bench.py --markdown)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(files):
    """Markdown of saved bench JSON files (e.g. scripts/gpu_check.sh's), one heading per file and section."""
    out = []
    for path in files:
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a bench.py JSON file ({type(e).__name__})") from None
        meta = results.get("meta", {})
        out.append(f"### {os.path.basename(path)}: preset {meta.get('preset')}, {meta.get('device')} "
                   f"({meta.get('gpu') or meta.get('machine')}), torch {meta.get('torch')}, commit "
                   f"{str(meta.get('git_commit'))[:10]}")
        for name, rows in results.items():
            if name != "meta":
                out += ["", f"#### {name}", "", markdown_table(rows)]
        out.append("")
    return "\n".join(out)


def print_table(name, rows):
    print(f"== {name}")
    if not rows:
        print("(no rows)")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    sys.stdout.flush()


def run_meta(args):
    from checkpoint import git_commit
    return dict(preset=args.preset_name, preset_settings=asdict(args.preset), repeats=args.repeats,
                warmup=args.warmup, variants=args.variants, device=args.device, threads=torch.get_num_threads(),
                torch=torch.__version__, cpu_count=os.cpu_count(), machine=platform.machine(), python=platform.python_version(),
                gpu=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
                load_average_start=[round(x, 2) for x in os.getloadavg()], git_commit=git_commit(),
                started=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=list(PRESETS) + list(bench_real.PRESETS),
                        help="model size: tiny (seconds), small (6 x 384, block 256), gpt2 (124M, block 1024), "
                             "gpt2-xl (1.5B, for GPUs); smollm2 (SmolLM2-135M's LLaMA shapes), tiny-llama (seconds)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)} except "
                             f"{', '.join(ON_REQUEST)}, which run only when named; with smollm2 and tiny-llama: "
                             f"{', '.join(bench_real.SECTIONS)})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first rounds (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (0 = torch's default; default: the preset's, 1 for tiny)")
    parser.add_argument("--variants", default=",".join(STEP_VARIANTS),
                        help=f"training-step variants to time (dense, the baseline, always runs): "
                             f"{', '.join(STEP_VARIANTS)}")
    parser.add_argument("--prune_methods", default=",".join(PRUNE_METHODS),
                        help=f"rows of the prune section (the dense forward, the unit, always runs): "
                             f"{', '.join(PRUNE_METHODS)}")
    parser.add_argument("--out", default=None, help="JSON file (default: out/bench_PRESET_DEVICE.json)")
    parser.add_argument("--markdown", nargs="+", default=None, metavar="JSON",
                        help="print saved results (e.g. from scripts/gpu_check.sh) as Markdown tables and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        text = render_markdown(args.markdown)
        print(text)
        return text
    real = args.preset in bench_real.PRESETS
    args.only = args.only or ",".join(bench_real.SECTIONS if real else [n for n in SECTIONS if n not in ON_REQUEST])
    requested = [n for n in args.only.split(",") if n]
    unknown = [n for n in requested if n not in SECTIONS]
    if unknown or not requested:
        raise UserError(f"unknown section(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(SECTIONS)}")
    names = [n for n in SECTIONS if n in requested]  # always in SECTIONS order
    if any((n in bench_real.SECTIONS) != real for n in names):
        raise UserError(f"--only {args.only} with --preset {args.preset}: {', '.join(bench_real.SECTIONS)} run with "
                        f"--preset {' or '.join(bench_real.PRESETS)}, every other section with a GPT-2 preset")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in STEP_VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(STEP_VARIANTS)}")
    args.variants = ["dense"] + [v for v in STEP_VARIANTS if v in variants and v != "dense"]
    methods = [m for m in args.prune_methods.split(",") if m]
    unknown = [m for m in methods if m not in PRUNE_METHODS]
    if unknown or not methods:
        raise UserError(f"unknown prune method(s) {', '.join(unknown) or '(none given)'}: choose from "
                        f"{', '.join(PRUNE_METHODS)}")
    args.prune_methods = [m for m in PRUNE_METHODS if m in methods]
    args.preset_name, args.preset = args.preset, (bench_real.PRESETS if real else PRESETS)[args.preset]
    args.threads = args.preset.threads if args.threads is None else args.threads
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the fresh-process measurements use it too
    args.repeats_given = args.repeats is not None
    args.repeats = args.preset.repeats if args.repeats is None else args.repeats
    args.warmup = args.preset.warmup if args.warmup is None else args.warmup
    if args.repeats < 1 or args.warmup < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")
    args.bench = Workbench(args)
    out = args.out or os.path.join(REPO_ROOT, "out", f"bench_{args.preset_name}_{args.device.replace(':', '')}.json")

    meta = run_meta(args)
    print(f"bench.py --preset {args.preset_name}: {args.preset.n_layer} layers x {args.preset.n_embd}, block "
          f"{args.preset.block_size}, batch {args.preset.batch_size}; {args.device}, {meta['threads']} threads, "
          f"torch {torch.__version__}; {args.repeats} timed rounds after {args.warmup} warm-up; "
          f"load average {meta['load_average_start']}")
    if args.repeats < 5:
        print("note: fewer than 5 timed rounds: the figures below are a smoke test, not a measurement")
    results = {"meta": meta}
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        t_section = time.perf_counter()
        results[name] = SECTIONS[name](args)
        print_table(f"{name} ({time.perf_counter() - t_section:.1f} s)", results[name])
        later = [SECTION_TRAINERS.get(n, ()) for n in names[i + 1:]]
        args.bench.keep_only({v for used in later for v in (args.variants if used is None else used)})
    meta.update(seconds=round(time.perf_counter() - t0, 1), load_average_end=[round(x, 2) for x in os.getloadavg()],
                max_rss_mib=round(_ru_maxrss_bytes() / MiB))
    print(f"done in {meta['seconds']} s; load average at the end {meta['load_average_end']}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    run(main)
