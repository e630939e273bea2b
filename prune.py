r"""One-shot pruning baselines (no training): magnitude, Wanda and SparseGPT, to N:M or unstructured sparsity, for
every decoder-only model family (found in the model, families.py), optionally followed by local reconstruction.

    python prepare_calibration_data.py --tokenizer opt-125m --seqlen 2048 --input C4_TRAIN_SHARD --out calib.pt
    python prune.py --model opt-125m --method sparsegpt --n 2 --m 4 --calibration calib.pt --out out/sparsegpt.pt

Wanda and SparseGPT run as their published code does. Block 0's inputs for the calibration windows are captured
once, with whatever the family's blocks take besides the hidden states (attention mask, position ids, rotary
position embeddings: families.capture_block_inputs). Then, block by block, the block's sparse layers (every
linear inside it, e.g. GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, and mixture-of-experts weights
expert by expert: families.sparse_filter) are pruned from the inputs captured in ONE dense forward of that
block (so the later linears of a block see inputs made by its still-dense earlier linears), then the block's
outputs are recomputed with the pruned block and become the next block's inputs: later blocks see the errors
of the already-pruned earlier ones. Only one block's activations are held at a time: its inputs and the dense
block's outputs, (nsamples, seqlen, width) each (with --reconstruct, also one submodule's inputs and targets).
Magnitude needs no data. The per-block output error (relative MSE of the pruned block against the dense block on
the same inputs) is reported for every method that runs the loop.

--reconstruct True, after any method: local reconstruction ("A Free Lunch in LLM Compression", arXiv
2510.14444). In each block, once its masks are set, its attention and then its MLP (--recon_parts) are trained
for --recon_epochs epochs with Adam (--recon_lr) to reproduce the dense submodule's outputs on the same inputs
(MSE), one calibration batch per step in an order drawn from --seed; the MLP trains on the inputs that the
reconstructed attention gives it. Masks stay fixed and pruned weights exactly zero; the kept weights and the
biases of the submodule's linears change, norms, embeddings and the head do not. The targets are the dense
submodule on the pruned model's own inputs, so each submodule repairs its own pruning error (not the drift
accumulated before it). It is fitted on the calibration windows only: judge it on held-out text (WikiText-2).

The result carries real SparseLinear masks (check_nm verifies them) and the pruned weights are exactly zero;
SparseGPT also updates the kept weights (error compensation). --n counts the weights KEPT per group of --m
(the published scripts' prune_n counts the pruned ones: the same for 2:4). A `.pt` output is a checkpoint
that main.py `--init_from` and evaluate.py read; a folder output is a Hugging Face folder of the model's own
transformers class (see export.py).
"""
import argparse
import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cli
import families
from checkpoint import load_model, model_state, save_checkpoint
from cli import UserError
from data.loader import BinDataset, check_tokenizer, check_wikitext, load_calibration, load_wikitext_tokens
from data.tokenizer import prepare_flag
from evaluate import MAX_EVAL_WINDOW, eval_window, sparsity_report, validation_loss, wikitext_perplexity
from sources import MODEL_HELP
from sparsity import (TIE_RULES, check_pattern, collect_input_norms, dense_forward, nm_mask, observe_inputs,
                      sparse_layers, sparsify, unstructured_mask)

METHODS = ("magnitude", "wanda", "sparsegpt")
# Where each method ranks weights when pruning to an unstructured --sparsity, as in its published code:
# magnitude per layer, Wanda per output row, SparseGPT per block of 128 columns (hence per layer too).
UNSTRUCTURED_SCOPE = {"magnitude": "unstructured_layer", "wanda": "unstructured", "sparsegpt": "unstructured_layer"}


# ------------------------------------------------------------------------------------------------ SparseGPT
@torch.no_grad()
def sparsegpt_layer(weight, H, n=2, m=4, sparsity=0.0, blocksize=128, percdamp=0.01, ties="high"):
    """SparseGPT (Frantar & Alistarh, 2023) on one linear layer: returns (new weight, bool keep mask).

    weight: (out, in); H: (in, in) Hessian 2XXᵀ of the layer's inputs. With sparsity == 0 the mask is n:m
    (chosen one group of m columns at a time), else unstructured at that sparsity (chosen per block of
    columns). Columns are processed left to right in blocks of `blocksize`; each pruned weight's error is
    spread over the not yet processed columns through the inverse Hessian (OBS update). Pruned entries of
    the returned weight are exactly zero.
    """
    W = weight.detach().clone().float()
    cols = W.shape[1]
    H = H.detach().clone().float().to(W.device)
    # An input that is always zero on the calibration data carries no information: its weights are zeroed
    # and its diagonal set to 1 so that H stays invertible (as published).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, device=W.device)
    try:
        # The upper Cholesky factor of H⁻¹: its rows give the OBS updates of all later columns at once, and
        # its diagonal enters the saliency w² / [H⁻¹]²_jj (the published formulation).
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise UserError("the layer's Hessian is not positive definite even after dampening: raise --percdamp "
                        "or use more calibration samples") from None
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if sparsity > 0:  # unstructured: the whole block of columns is ranked at once
            keep1 = unstructured_mask(W1 ** 2 / d.unsqueeze(0) ** 2, sparsity, scope="layer")
        for i in range(i2 - i1):
            if sparsity == 0 and i % m == 0:
                # N:M: choose the group's mask from the weights as updated by the columns before it
                keep1[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2, n, m, ties)
            w = W1[:, i]
            q = w * keep1[:, i]
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the block's errors, propagated to every later column
    return W.to(weight.dtype) * keep, keep


class Hessians:
    """H = (2 / tokens) Σ_tokens x xᵀ of each layer's inputs (of each expert's, for an expert weight) as a running
    mean (H does not grow with the data), fed by sparsity.observe_inputs. The published code divides by the number
    of sequences instead, i.e. its H is ours times seqlen; SparseGPT's result does not depend on H's scale (the
    dampening is a fraction of mean diag(H) and the updates use ratios of H⁻¹'s entries). Counting rows, not
    sequences, keeps that true for OPT's fc1/fc2, which see their inputs flattened to (batch·seqlen, C), and for
    experts, which see only the tokens routed to them."""

    def __init__(self):
        self.H, self.rows = {}, {}

    def __call__(self, layer, x, expert):
        key = (id(layer), expert)
        x = x.float()
        if key not in self.H:
            self.H[key] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            self.rows[key] = 0
        H, rows = self.H[key], self.rows[key]
        H *= rows / (rows + len(x))
        rows = self.rows[key] = rows + len(x)
        x = math.sqrt(2 / rows) * x
        H += x.t() @ x

    def pop(self, layer, expert=None):
        """The layer's (expert's) H, or the identity when no calibration token reached it (an expert the router
        never chose): SparseGPT with H = I prunes by magnitude and compensates nothing."""
        H = self.H.pop((id(layer), expert), None)
        return torch.eye(layer.in_features, device=layer.weight.device) if H is None else H


# ------------------------------------------------------------------------------------------------ the model
# On a CPU the plain block loop runs at most this many tokens per forward: a block's elementwise work (norms,
# rotary embeddings, the MLP's activation and product) on larger (tokens, width) activations no longer stays in a
# core's cache, and costs more per token than the published code's one window at a time (bench.py --preset
# smollm2, BENCHMARKS.md "Real shapes"). A window's outputs do not depend on the batch, but the Wanda statistics
# and SparseGPT Hessians are summed in another order, so masks can differ where scores are within rounding.
CPU_TOKENS_PER_FORWARD = 512


def forward_batch(tokens, batch_size, reconstruct):
    """Windows per block forward: --batch_size, capped on a CPU at CPU_TOKENS_PER_FORWARD tokens (at least one
    window); with reconstruction --batch_size as given (it is also the reconstruction's step size)."""
    if reconstruct is not None or tokens.device.type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_TOKENS_PER_FORWARD // tokens.shape[1]))


def batches(n, batch_size):
    """Slices of the calibration windows, the same ones at every pass (block arguments are keyed by their size)."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def run_block(block, x, calls, batch_size):
    """Replace x (nsamples, seqlen, C) by block(x), batch by batch, in place (each row depends only on itself)."""
    for s in batches(len(x), batch_size):
        x[s] = families.call_block(block, x[s], calls)
    return x


def relative_error(out, target, batch_size=8):
    """‖out − target‖² / ‖target‖²: the share of the dense output's energy the pruned block gets wrong (squares in
    the activations' dtype, sums accumulated in float64, a few windows at a time: no float64 copy is made)."""
    num = den = 0.0
    for s in batches(len(out), batch_size):
        t = target[s]
        num += float(torch.sum((out[s] - t).square(), dtype=torch.float64))
        den += float(torch.sum(t.square(), dtype=torch.float64))
    return num / max(den, 1e-30)


@torch.no_grad()
def prune_block(block, method, x, calls, n, m, sparsity, batch_size, blocksize, percdamp):
    """Set the masks of one block's linears (SparseGPT: and its weights) from ONE dense forward of its inputs x,
    as published; returns that forward's outputs, the dense block's outputs on x. An expert weight is pruned
    expert by expert, each from the tokens routed to it."""
    layers = sparse_layers(block)
    dense_out = torch.empty_like(x)
    hessians = Hessians()
    if method == "wanda":  # Σ x_j² of every linear (every expert) of the block
        stats = collect_input_norms(block)
    else:
        stats = observe_inputs(block, hessians) if method == "sparsegpt" else contextlib.nullcontext()
    with dense_forward(block), stats:
        for s in batches(len(x), batch_size):
            dense_out[s] = families.call_block(block, x[s], calls)
    for name, layer in layers:
        if method == "wanda":
            layer.init_mask_and_slorb()
        elif method == "sparsegpt":
            experts = [None] if layer.weight.dim() == 2 else range(layer.weight.shape[0])
            for e in experts:
                weight, mask = (layer.weight, layer.mask) if e is None else (layer.weight[e], layer.mask[e])
                new, keep = sparsegpt_layer(weight, hessians.pop(layer, e), n, m, sparsity, blocksize, percdamp,
                                            layer.ties)
                weight.copy_(new)
                mask.copy_(keep)
            layer.init_mask.copy_(layer.mask)
    return dense_out  # magnitude: the masks were set from |W| already


# ------------------------------------------------------------------------------------------------ reconstruction
@dataclass
class Reconstruction:
    """Local reconstruction after one-shot pruning ("A Free Lunch in LLM Compression", arXiv 2510.14444): each
    pruned submodule is trained to reproduce the dense submodule's outputs on the same inputs."""
    epochs: int = 10
    lr: float = 1e-4
    parts: tuple = ("attn", "mlp")
    seed: int = 0


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_part_inputs(block, part, x, calls, batch_size):
    """[(args, kwargs)] of the part's entry module, one per calibration batch, from the block run on x (the
    forward stops at the entry: nothing after it is needed)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Captured

    handle = part.entry.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in batches(len(x), batch_size):
            try:
                families.call_block(block, x[s], calls)
            except _Captured:
                pass
    finally:
        handle.remove()
    return seen


def train_part(part, inputs, targets, cfg, generator):
    """Adam on the part's sparse linears (weights and biases) for cfg.epochs epochs of MSE against the targets,
    one calibration batch per step in a seeded order. Masks stay fixed; the masked forward (ste off) gives
    the pruned weights no gradient, so Adam leaves them where they are (exactly zero once pruning finishes)."""
    layers = [layer for module in part.modules for _, layer in sparse_layers(module)]
    params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    saved_ste, saved_grad = [layer.ste for layer in layers], [p.requires_grad for p in params]
    for layer in layers:
        layer.ste = False
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    try:
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                for j in torch.randperm(len(inputs), generator=generator).tolist():
                    args, kwargs = inputs[j]
                    loss = F.mse_loss(part.run(args, kwargs), targets[j])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        for layer, ste in zip(layers, saved_ste):
            layer.ste = ste
        for p, grad in zip(params, saved_grad):
            p.requires_grad_(grad)
        for module in part.modules:
            for p in module.parameters():
                p.grad = None


@torch.no_grad()
def part_error(part, inputs, targets):
    num = sum(float((part.run(a, k).double() - t.double()).pow(2).sum()) for (a, k), t in zip(inputs, targets))
    return num / max(sum(float(t.double().pow(2).sum()) for t in targets), 1e-30)


@torch.no_grad()
def reconstruct_block(model, block, dense, x, calls, cfg, batch_size, generator):
    """Local reconstruction of one pruned block, attention first, then the MLP on the inputs the reconstructed
    attention gives it. `dense` is a copy of the block taken before pruning. Returns {part: [error before,
    error after]} (relative MSE of the part's output on the calibration windows)."""
    parts, dense_parts = families.block_parts(model, block), families.block_parts(model, dense)
    errors = {}
    for name in ("attn", "mlp"):
        if name not in cfg.parts:
            continue
        inputs = capture_part_inputs(block, parts[name], x, calls, batch_size)
        with dense_forward(dense):
            targets = [dense_parts[name].run(a, k) for a, k in inputs]
        before = part_error(parts[name], inputs, targets)
        train_part(parts[name], inputs, targets, cfg, generator)
        errors[name] = [before, part_error(parts[name], inputs, targets)]
        del inputs, targets
    return errors


# ------------------------------------------------------------------------------------------------ the loop
@torch.no_grad()
def prune_model(model, method, n=2, m=4, sparsity=0.0, tokens=None, batch_size=8, blocksize=128,
                percdamp=0.01, reconstruct=None, progress=None, report=None, ties="high"):
    """Prune a dense model of any family in place with magnitude, Wanda or SparseGPT, optionally followed by local
    reconstruction; returns the model with SparseLinear masks.

    tokens: (nsamples, seqlen) calibration windows on the model's device (magnitude alone needs none).
    sparsity > 0 selects unstructured pruning at that sparsity instead of n:m.
    ties: which of two equal scores an n:m group keeps, the higher input index or the lower (sparsity.nm_mask).
    reconstruct: a Reconstruction, or None for plain one-shot pruning.
    progress: report each block (a bar on a terminal, else a line with the ETA: cli.Progress); False = silent.
    report: a list; one dict per block is appended (its output error against the dense block on the same inputs,
    relative MSE, and with reconstruction each part's error before and after it).
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    mask_type = "structured" if sparsity == 0 else UNSTRUCTURED_SCOPE[method]
    metric = "wanda" if method == "wanda" else "magnitude"
    model.eval()
    # Masks start all-ones (init_masks=False) and are set block by block below; magnitude sets them all now.
    sparsify(model, n=n, m=m, metric=metric, mask_type=mask_type, sparsity=sparsity,
             filter_fn=families.sparse_filter(model), init_masks=method == "magnitude", ties=ties)
    if method != "magnitude" or reconstruct is not None:
        if tokens is None:
            raise UserError(f"--method {method}{' with --reconstruct' if reconstruct else ''} needs calibration "
                            "data (--calibration FILE)")
        batch_size = forward_batch(tokens, batch_size, reconstruct)
        x, calls = families.capture_block_inputs(model, tokens, batch_size)
        generator = torch.Generator().manual_seed(reconstruct.seed) if reconstruct else None
        bar = cli.Progress(len(model.blocks), method + (" + reconstruction" if reconstruct else ""), unit="block",
                           enabled=progress is not False, every=0)
        for i, block in enumerate(model.blocks):
            dense = copy.deepcopy(block) if reconstruct else None  # the dense submodules give the targets
            dense_out = prune_block(block, method, x, calls[i], n, m, sparsity, batch_size, blocksize, percdamp)
            row = {"block": i}
            if reconstruct:
                t0 = time.time()
                row.update(reconstruct_block(model, block, dense, x, calls[i], reconstruct, batch_size, generator))
                row["reconstruct_seconds"] = round(time.time() - t0, 3)
                del dense
            for _, layer in sparse_layers(block):  # pruned weights zero now: the forward needs no W ⊙ M per batch
                layer.weight.mul_(layer.mask)
            with dense_forward(block):
                run_block(block, x, calls[i], batch_size)  # the pruned block's outputs feed the next block
            row["output_error"] = relative_error(x, dense_out, batch_size)
            del dense_out
            if report is not None:
                report.append(row)
            bar.update()
        bar.close()
    for _, layer in sparse_layers(model):
        layer.weight.mul_(layer.mask)  # pruned weights exactly zero, whatever the method (magnitude: not yet)
    return model


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    p = cli.ArgumentParser(prog="prune.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense model: " + MODEL_HELP)
    p.add_argument("--method", required=True, choices=METHODS,
                   help="magnitude (|W|, no data); wanda (|W|·||X_j||, statistics block by block from the "
                        "already-pruned earlier blocks, as published); sparsegpt (OBS with error "
                        "compensation, block by block, as published); any of them + --reconstruct True")
    p.add_argument("--n", type=int, default=2, help="keep n of every m consecutive input weights")
    p.add_argument("--tie_break", default="high", choices=TIE_RULES,
                   help="of two equal scores in an n:m group keep the higher input index (measured best on a "
                        "4-bit-grid model, README \"Ties at the N:M boundary\") or the lower")
    p.add_argument("--m", type=int, default=4, help="group size of the n:m pattern")
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="> 0: unstructured pruning at this sparsity instead of n:m (ranked per layer for "
                        "magnitude, per output row for wanda, per block of columns for sparsegpt)")
    p.add_argument("--calibration", default="", help="calibration file from prepare_calibration_data.py, made "
                                                     "with the model's tokenizer (needed by wanda, sparsegpt "
                                                     "and --reconstruct)")
    p.add_argument("--nsamples", type=int, default=0, help="use only the first N calibration windows (0 = all)")
    p.add_argument("--seqlen", type=int, default=0,
                   help="calibration window length: crop the file's windows to this (0 = as the file holds them, "
                        "at most the model's context; make them with prepare_calibration_data.py --seqlen)")
    p.add_argument("--eval_block_size", "--block_size", type=int, default=0, dest="eval_block_size",
                   help=f"WikiText-2 window and C4 validation sequence length (0 = the model's context, at most "
                        f"{MAX_EVAL_WINDOW}: GPT-2 1024, OPT 2048, LLaMA-2 4096, as Wanda/SparseGPT)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="windows per forward pass (pruning on a CPU without --reconstruct: at most "
                        f"{CPU_TOKENS_PER_FORWARD} tokens' worth, at least one window)")
    p.add_argument("--reconstruct", type=cli.parse_bool, default=False,
                   help="after pruning each block, train its pruned attention and MLP to reproduce the dense "
                        "submodules' outputs on the calibration windows (local reconstruction, masks fixed)")
    p.add_argument("--recon_epochs", type=int, default=Reconstruction.epochs,
                   help="reconstruction: passes over the calibration windows per submodule")
    p.add_argument("--recon_lr", type=float, default=Reconstruction.lr,
                   help="reconstruction: Adam learning rate (1e-4: conservative for pretrained LLM weights, not "
                        "tuned at that scale here; the demo's 32-wide model does best at 3e-3)")
    p.add_argument("--recon_parts", default=",".join(Reconstruction.parts),
                   help="reconstruction: which submodules of each block, comma-separated: attn, mlp")
    p.add_argument("--seed", type=int, default=0, help="reconstruction: seeds the order of the calibration batches")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT: columns per lazy-update block")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT: dampening, fraction of mean diag(H)")
    p.add_argument("--out", default="", help="a .pt path writes a checkpoint (main.py --init_from, evaluate.py); "
                                             "any other path writes a Hugging Face folder of the model's class")
    p.add_argument("--tokenizer_dir", default="", help="folder out: copy the tokenizer from here (see export.py)")
    p.add_argument("--wikitext_dir", default="data/wikitext", help="folder with test.bin ('' to skip perplexity)")
    p.add_argument("--ppl_windows", type=int, default=0, help="first N WikiText-2 windows only (0 = all)")
    p.add_argument("--data_dir", default="", help="folder with val.bin for the C4 validation loss ('' to skip)")
    p.add_argument("--eval_iters", type=int, default=100, help="C4 validation batches")
    p.add_argument("--results", default="", help="write the results as JSON here")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    try:
        check_pattern(args.n, args.m)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    parts = tuple(p for p in args.recon_parts.split(",") if p)
    if not parts or any(p not in Reconstruction.parts for p in parts):
        raise UserError(f"--recon_parts {args.recon_parts!r}: choose from {', '.join(Reconstruction.parts)}")
    if args.recon_epochs < 1 or args.recon_lr <= 0:
        raise UserError("--recon_epochs must be >= 1 and --recon_lr > 0")
    args.reconstruction = Reconstruction(args.recon_epochs, args.recon_lr, parts, args.seed) \
        if args.reconstruct else None
    if (args.method != "magnitude" or args.reconstruct) and not args.calibration:
        what = f"--method {args.method}" + (" --reconstruct True" if args.reconstruct else "")
        raise UserError(f"{what} needs --calibration FILE: make one with `python prepare_calibration_data.py "
                        f"--input C4_FILES{prepare_flag(args.model)}`")
    if args.sparsity == 0 and args.method == "sparsegpt" and args.blocksize % args.m:
        raise UserError(f"--blocksize {args.blocksize} must be a multiple of --m {args.m}")
    if min(args.batch_size, args.blocksize) < 1 or min(args.eval_block_size, args.seqlen, args.nsamples,
                                                        args.percdamp) < 0:
        raise UserError("--batch_size and --blocksize must be >= 1; --eval_block_size, --seqlen, --nsamples, "
                        "--percdamp >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    # every input is read before the model is pruned: a wrong path fails fast, not after the work
    tokens = meta = None
    if args.method != "magnitude" or args.reconstruct:
        tokens, meta = load_calibration(args.calibration, prepare_flag(args.model))
        if args.nsamples > len(tokens):
            raise UserError(f"--nsamples {args.nsamples} but {args.calibration} holds only {len(tokens)} windows")
        tokens = tokens[:args.nsamples or len(tokens)]
    wikitext = load_wikitext_tokens(args.wikitext_dir, "test", prepare_flag(args.model)) if args.wikitext_dir else None
    model = load_model(args.model)
    if sparse_layers(model):
        raise UserError(f"{args.model} is already sparse: prune.py starts from a dense model")
    if tokens is not None:
        check_tokenizer(meta, model, args.calibration)
    if wikitext is not None:
        check_wikitext(args.wikitext_dir, wikitext, model)
    block_size = eval_window(model, args.eval_block_size)
    val = BinDataset(os.path.join(args.data_dir, "val.bin"), block_size, prepare_flag(args.model)).check_model(model) \
        if args.data_dir else None
    model.to(args.device)
    if tokens is not None:
        tokens = tokens[:, :args.seqlen or tokens.shape[1]]
        if tokens.shape[1] > model.config.block_size:
            raise UserError(f"{args.calibration} holds windows of {tokens.shape[1]} tokens, more than the model's "
                            f"context {model.config.block_size}: pass --seqlen {model.config.block_size} or less")
        tokens = tokens.to(args.device)
    blocks = []
    t0 = time.time()
    try:
        prune_model(model, args.method, args.n, args.m, args.sparsity, tokens, args.batch_size, args.blocksize,
                    args.percdamp, reconstruct=args.reconstruction, report=blocks, ties=args.tie_break)
    except ValueError as e:  # a pattern that does not fit the model's widths
        raise UserError(str(e)) from None
    prune_seconds = time.time() - t0
    report = sparsity_report(model)
    recon = args.reconstruction
    result = {"model": args.model, "family": model.family, "method": args.method, "training": False, "tokens": 0,
              "pattern": f"{args.n}:{args.m}" if args.sparsity == 0 else f"unstructured {args.sparsity}",
              "n": args.n, "m": args.m, "tie_break": args.tie_break, "sparsity": args.sparsity, **report,
              "calibration": args.calibration or None, "nsamples": None if tokens is None else len(tokens),
              "seqlen": None if tokens is None else tokens.shape[1],
              "reconstruct": None if recon is None else {"epochs": recon.epochs, "lr": recon.lr,
                                                         "parts": list(recon.parts), "seed": recon.seed},
              "prune_seconds": round(prune_seconds, 2), "eval_block_size": block_size}
    if args.method == "sparsegpt":
        result.update(blocksize=args.blocksize, percdamp=args.percdamp)
    if blocks:
        errors = [row["output_error"] for row in blocks]
        result.update(block_output_error=errors, mean_block_output_error=sum(errors) / len(errors), blocks=blocks)
    if recon is not None:
        result["reconstruct_seconds"] = round(sum(row["reconstruct_seconds"] for row in blocks), 2)
    what = args.method + (" + reconstruction" if recon else "")
    print(f"{what} {result['pattern']}: {report['sparse_layers']} layers, mean sparsity "
          f"{report['mean_sparsity']:.4f}, N:M ok {report['nm_ok']}, {prune_seconds:.1f} s"
          + (f" ({result['reconstruct_seconds']:.1f} s of it reconstruction)" if recon else ""))
    if blocks:
        print(f"block output error vs the dense block (relative MSE on the calibration windows): mean "
              f"{result['mean_block_output_error']:.4g}, per block " + " ".join(f"{e:.3g}" for e in errors))
    if args.out:
        if args.out.endswith(".pt"):
            save_checkpoint({**model_state(model), "prune": {**result, "calibration_meta": meta}}, args.out)
        else:
            from export import export_model
            export_model(model, args.out, tokenizer_dirs=[args.tokenizer_dir, args.model],
                         source=f"prune.py --method {args.method} --reconstruct {bool(recon)} --model {args.model}")
        result["out"] = args.out
        print(f"wrote {args.out}")
    model.eval()
    if wikitext is not None:
        result["wikitext_ppl"] = wikitext_perplexity(model, wikitext, block_size, args.ppl_windows, args.batch_size,
                                                     args.device, progress=True)
        result["ppl_windows"] = args.ppl_windows
        print(f"wikitext-2 ppl {result['wikitext_ppl']:.2f}")
    if val is not None:
        result["val_loss"] = validation_loss(model, val, args.batch_size, args.eval_iters, args.device,
                                             progress=True)
        print(f"C4 val loss {result['val_loss']:.4f}")
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        cli.write_json(args.results, result)
    return result


if __name__ == "__main__":
    cli.run(main)
