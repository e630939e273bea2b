"""Real shapes for bench.py: `python bench.py --preset smollm2 [--only real_step|real_prune]`.

SmolLM2-135M's architecture (LLaMA: 30 blocks, hidden 576, 9 heads / 3 kv heads, MLP 1536, vocabulary 49152, tied
embedding) with random weights (no timing here depends on their values), built by families.from_config: the
transformers LlamaForCausalLM behind families.HFCausalLM, the code path main.py and prune.py take for every
Hugging Face model. `tiny-llama` is the same code at test size (seconds).

  real_step   main.py's training step at batch 4 x 256 = 1024 tokens (the demo's shape): dense (the baseline), the
              2:4 masked step, and AST-Boosted (masks + SR-STE + SLoRB k=16 trainable + distillation from a frozen
              dense teacher) with the teacher in fp32 and, where the CPU has bf16 instructions (avx512_bf16, AMX)
              or on a GPU, in bf16. Each as a ratio to the dense step of the same round.
  real_prune  one-shot 2:4 pruning of the whole model, per block: prune.py's prune_model (magnitude, Wanda,
              SparseGPT) against the published procedures reimplemented below (the published Wanda code's
              magnitude, Wanda and SparseGPT paths; SparseGPT's per-layer prune as in IST-DASLab/sparsegpt), each
              pair on the same calibration windows in the same round; the ratio ours / published per round, and
              the share of mask decisions on which the two agree.
"""
import copy
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn

from bench_core import Trainer, Variant, interleaved, paired_ratio, time_stats, train_config, verdict
from cli import UserError

SMOLLM2_135M = dict(  # the config.json of HuggingFaceTB/SmolLM2-135M(-Instruct), architecture only
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_parameters=dict(rope_theta=100000.0, rope_type="default"), tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)

TINY_LLAMA = dict(SMOLLM2_135M, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


@dataclass(frozen=True)
class RealPreset:
    config: dict           # the transformers config of the model (model_type llama)
    block_size: int        # training window
    batch_size: int        # windows per training step
    repeats: int           # timed rounds of real_step (after the warm-up rounds)
    prune_repeats: int     # timed rounds of real_prune (a round prunes the whole model six times)
    warmup: int
    prune_windows: int     # calibration windows
    prune_window: int      # tokens per calibration window
    prune_batch: int = 8   # prune.py's --batch_size (its default): windows per forward of ours
    threads: int = 1

    @property
    def n_layer(self):
        return self.config["num_hidden_layers"]

    @property
    def n_embd(self):
        return self.config["hidden_size"]


PRESETS = {
    # the training shape (4 x 256) and a quarter of its calibration set (32 x 512): about 6 + 12 min
    "smollm2": RealPreset(SMOLLM2_135M, block_size=256, batch_size=4, repeats=5, prune_repeats=3, warmup=1,
                          prune_windows=8, prune_window=512),
    "tiny-llama": RealPreset(TINY_LLAMA, block_size=32, batch_size=2, repeats=5, prune_repeats=5, warmup=1,
                             prune_windows=4, prune_window=32, prune_batch=2),
}

# Ceilings carried over from the gpt2 preset's targets (bench.STEP_VARIANTS), so both shapes read alike.
VARIANTS = {
    "dense": Variant("dense, torch AdamW"),
    "masks": Variant("2:4 masks (STE), torch AdamW", sparse=True, target=1.03),
    "ast_boosted": Variant("AST-Boosted: masks + SR-STE + SLoRB k=16 (trainable) + distillation, fp32 teacher",
                           sparse=True, srste=True, slorb="trainable", distill=True, teacher_dtype="float32",
                           target=1.40),
    "ast_boosted_bf16": Variant("AST-Boosted, teacher held in bf16 (--teacher_dtype bfloat16)", sparse=True,
                                srste=True, slorb="trainable", distill=True, teacher_dtype="bfloat16"),
}
SECTIONS = ("real_step", "real_prune")


def build_model(config, device="cpu", seed=0):
    """A random-weight model of the config, as families loads every Hugging Face model (HFCausalLM)."""
    import families

    torch.manual_seed(seed)
    return families.from_config(config["model_type"], config).to(device)


def block_linear_weights(model) -> int:
    """Weights of the layers 2:4 applies to (families.sparse_filter: every linear inside a block)."""
    import families

    chosen = families.sparse_filter(model)
    return sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and chosen(name, m))


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX), from /proc/cpuinfo (Linux; else no)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


# ------------------------------------------------------------------------------------------------ real_step
def real_step(args):
    """main.py's training step per variant on the real shape, as a ratio to the dense step of the same round."""
    from distill import TEACHER_DTYPES, Teacher

    p, device = args.preset, args.device
    bf16 = device.startswith("cuda") or cpu_has_bf16()
    names = [name for name, v in VARIANTS.items() if bf16 or v.teacher_dtype != "bfloat16"]
    teachers = {}
    trainers = {}
    for name in names:
        v = VARIANTS[name]
        if v.distill and v.teacher_dtype not in teachers:
            teachers[v.teacher_dtype] = Teacher(build_model(p.config, seed=1)).to(
                device=device, dtype=TEACHER_DTYPES[v.teacher_dtype])
        trainers[name] = Trainer(build_model(p.config), v, train_config(v, p.block_size, p.batch_size), device,
                                 teacher=teachers.get(v.teacher_dtype) if v.distill else None)
    weights = block_linear_weights(trainers["dense"].model)
    times = interleaved({name: t.step for name, t in trainers.items()}, args.repeats, args.warmup, device)
    rows = []
    for name in names:
        v = VARIANTS[name]
        row = dict(variant=name, what=v.label, tokens=p.batch_size * p.block_size, block_linear_weights=weights,
                   **time_stats(times[name]), **paired_ratio(times[name], times["dense"]))
        rows.append(dict(row, target=v.target if v.target is not None else "",
                         met=verdict(row["ratio_min"], row["ratio_max"], v.target)))
    if not bf16:
        rows.append(dict(variant="ast_boosted_bf16", skipped="this CPU has neither avx512_bf16 nor AMX: bf16 would "
                                                             "be emulated, which main.py's CPU default avoids"))
    return rows


# ------------------------------------------------------------------------------------------------ published
# The published one-shot procedures, written from their description (locuslab/wanda lib/prune.py and
# layerwrapper.py, IST-DASLab/sparsegpt sparsegpt.py) for timing against prune.py: every calibration window
# runs through the model alone until block 0 catches its input; then per block, every window alone through the
# dense block with hooks accumulating the statistic on each linear, each linear pruned, and every window alone
# again through the pruned block for the next block's inputs. N:M groups are chosen by torch.topk one group
# of columns at a time, as published. `n_pruned` counts the pruned weights of a group (their prune_n).
class _Caught(Exception):
    pass


@torch.no_grad()
def published_capture(model, tokens):
    """(block 0's inputs (windows, T, C), the other arguments the model passes its blocks), window by window."""
    inputs, other = [], {}

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        inputs.append(args[0] if args else kwargs.pop("hidden_states"))
        other.update(args=args[1:], kwargs=kwargs)
        raise _Caught

    handle = model.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for window in tokens:
            try:
                model.hf(window.unsqueeze(0), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return torch.cat(inputs), other


class ColumnNormMean:
    """Wanda's statistic as published: per input, the mean over windows of its squared norm over the window."""

    def __init__(self, layer):
        self.value, self.windows = torch.zeros(layer.in_features, device=layer.weight.device), 0

    def add(self, x):
        windows = x.shape[0] if x.dim() == 3 else 1
        self.value *= self.windows / (self.windows + windows)
        self.windows += windows
        self.value += torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]).float(), dim=0) ** 2 / self.windows


class HessianMean:
    """SparseGPT's H = 2 X Xᵀ as published: a running mean over windows (so H is per window, not per token)."""

    def __init__(self, layer):
        cols = layer.in_features
        self.value, self.windows = torch.zeros(cols, cols, device=layer.weight.device), 0

    def add(self, x):
        windows = x.shape[0] if x.dim() == 3 else 1
        self.value *= self.windows / (self.windows + windows)
        self.windows += windows
        x = math.sqrt(2 / self.windows) * x.reshape(-1, x.shape[-1]).float()
        self.value += x.t() @ x


def topk_group_mask(scores, n_pruned, m):
    """True where a weight is pruned: the n_pruned lowest scores of each group of m columns, group by group."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(0, scores.shape[1], m):
        lowest = torch.topk(scores[:, i:i + m].float(), n_pruned, dim=1, largest=False).indices
        pruned.scatter_(1, i + lowest, True)
    return pruned


@torch.no_grad()
def published_obs_prune(layer, H, n_pruned, m, blocksize=128, percdamp=0.01):
    """SparseGPT's per-layer N:M prune with error compensation, as published (the squared-error tally included)."""
    W = layer.weight.data.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    tally = torch.zeros(rows, device=W.device)
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        Wb, Hb = W[:, start:end].clone(), Hinv[start:end, start:end]
        Qb, errors, losses = torch.zeros_like(Wb), torch.zeros_like(Wb), torch.zeros_like(Wb)
        pruned = torch.zeros_like(Wb, dtype=torch.bool)
        for i in range(end - start):
            w, d = Wb[:, i], Hb[i, i]
            if i % m == 0:
                scores = Wb[:, i:i + m] ** 2 / torch.diag(Hb)[i:i + m].reshape(1, -1) ** 2
                pruned.scatter_(1, i + torch.topk(scores, n_pruned, dim=1, largest=False).indices, True)
            q = w.clone()
            q[pruned[:, i]] = 0
            Qb[:, i] = q
            losses[:, i] = (w - q) ** 2 / d ** 2
            err = (w - q) / d
            Wb[:, i:] -= err.unsqueeze(1) @ Hb[i, i:].unsqueeze(0)
            errors[:, i] = err
        W[:, start:end] = Qb
        tally += losses.sum(1) / 2
        W[:, end:] -= errors @ Hinv[start:end, end:]
    layer.weight.data = W.to(layer.weight.dtype)


def _block_out(block, x, other):
    out = block(x, *other["args"], **other["kwargs"])
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def published_prune(model, method, tokens, n=2, m=4):
    """The published code's prune_magnitude / prune_wanda / prune_sparsegpt on every block of the model (n kept of m)."""
    blocks, n_pruned = model.blocks, m - n
    if method == "magnitude":  # no data: |W| per layer
        for block in blocks:
            for layer in [mod for mod in block.modules() if type(mod) is nn.Linear]:
                layer.weight.data[topk_group_mask(layer.weight.data.abs(), n_pruned, m)] = 0
        return model
    inps, other = published_capture(model, tokens)
    outs = torch.zeros_like(inps)
    for block in blocks:
        layers = [mod for mod in block.modules() if type(mod) is nn.Linear]
        stats = {layer: (ColumnNormMean if method == "wanda" else HessianMean)(layer) for layer in layers}
        handles = [layer.register_forward_hook(lambda mod, inp, out, stats=stats: stats[mod].add(inp[0]))
                   for layer in layers]
        for j in range(len(inps)):
            outs[j] = _block_out(block, inps[j:j + 1], other)[0]
        for handle in handles:
            handle.remove()
        for layer in layers:
            if method == "wanda":
                scores = layer.weight.data.abs() * torch.sqrt(stats[layer].value.reshape(1, -1))
                layer.weight.data[topk_group_mask(scores, n_pruned, m)] = 0
            else:
                published_obs_prune(layer, stats[layer].value, n_pruned, m)
        for j in range(len(inps)):
            outs[j] = _block_out(block, inps[j:j + 1], other)[0]
        inps, outs = outs, inps
    return model


# ------------------------------------------------------------------------------------------------ real_prune
def kept(model, blocks=None):
    """The block linears' weights that are not zero, in block order (a pruned weight is exactly zero on both sides)."""
    return [mod.weight != 0 for block in list(model.blocks)[:blocks] for mod in block.modules()
            if isinstance(mod, nn.Linear)]


def agreement(a, b) -> float:
    """The share of weights on which two prunings made the same keep/prune decision."""
    same = sum(int((x == y).sum()) for x, y in zip(a, b))
    return same / sum(x.numel() for x in a)


def real_prune(args):
    """prune.py's prune_model against the published procedures, 2:4, per method; seconds per block and the ratio
    ours / published of the same round. Each call prunes a fresh copy of the dense model (copied untimed)."""
    import prune

    p, device = args.preset, args.device
    dense = build_model(p.config, device).eval()
    tokens = torch.randint(p.config["vocab_size"], (p.prune_windows, p.prune_window),
                           generator=torch.Generator().manual_seed(0)).to(device)
    last = {}  # the latest pruned model of each call, for the mask agreement

    def ours(method):
        def run(model):
            last[f"{method}, prune.py"] = prune.prune_model(model, method, tokens=tokens, batch_size=p.prune_batch,
                                                            progress=False)
        return run

    def published(method):
        def run(model):
            last[f"{method}, published"] = published_prune(model, method, tokens)
        return run

    methods = [m for m in prune.METHODS if m in args.prune_methods]  # reconstruction is not timed here
    if not methods:
        raise UserError(f"real_prune times {', '.join(prune.METHODS)}: pick some with --prune_methods")
    fns = {}
    for method in methods:
        fns[f"{method}, prune.py"], fns[f"{method}, published"] = ours(method), published(method)
    repeats = args.repeats if getattr(args, "repeats_given", False) else p.prune_repeats  # the run's header: steps
    times = interleaved(fns, repeats, args.warmup, device, setup={name: lambda: copy.deepcopy(dense) for name in fns})
    common = dict(model=f"llama {p.n_layer} x {p.n_embd}", windows=p.prune_windows, window=p.prune_window,
                  batch=p.prune_batch, ours_windows_per_forward=prune.forward_batch(tokens, p.prune_batch, None))
    rows = []
    for method in methods:
        a, b = f"{method}, prune.py", f"{method}, published"
        per_block = {name: [t / p.n_layer for t in times[name]] for name in (a, b)}
        ratio = paired_ratio(times[a], times[b], "ours_vs_published")
        for name in (a, b):
            row = dict(what=name, **common, rounds=len(times[name]), **time_stats(times[name]),
                       seconds_per_block=round(statistics.median(per_block[name]), 4))
            if name == a:
                row.update(ratio, target=1.0, met=verdict(ratio["ours_vs_published_min"],
                                                          ratio["ours_vs_published_max"], 1.0),
                           same_decisions=round(agreement(kept(last[a]), kept(last[b])), 6),
                           same_decisions_block0=round(agreement(kept(last[a], 1), kept(last[b], 1)), 6))
            rows.append(row)
    return rows
