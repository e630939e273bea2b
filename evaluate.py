"""Evaluation: WikiText-2 perplexity by the paper's protocol and C4 validation loss, as functions and a CLI.

    python evaluate.py --model out/ast/ckpt.pt --wikitext_dir data/wikitext --data_dir data/c4_dataset

WikiText-2: the test split's tokens (prepared once by data/wikitext/prepare.py, with the model's tokenizer)
are cut into non-overlapping windows of --eval_block_size tokens, the tail dropped; ppl = exp(mean next-token NLL
over all windows). The default window is the model's context as Wanda and SparseGPT evaluate (GPT-2 1024, OPT 2048,
LLaMA-2 4096), capped at MAX_EVAL_WINDOW for long-context models (SmolLM2 and LLaMA-3: 8192 -> 4096); a number is
comparable to another only at the same window, so every result records its eval_block_size.
Under DDP each rank takes every world_size-th window and the sums are all-reduced.
"""
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
from cli import UserError
from data.loader import BinDataset, check_wikitext, eval_offsets, load_wikitext_tokens
from data.tokenizer import prepare_flag
from sources import MODEL_HELP
from sparsity import check_nm, local, sparse_layers


def _all_reduce_sum(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _nll_sum(model, x, y):
    if hasattr(model, "features"):  # one of ours: the fused loss, the same value without the full logits
        return model(x, targets=y, return_logits=False)[1].double() * y.numel()
    logits, _ = model(x, targets=y)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")


@torch.no_grad()
def wikitext_perplexity(model, tokens, block_size, windows=0, batch_size=1, device="cpu", ctx=None,
                        rank=0, world_size=1, progress=False, should_stop=None):
    """exp(mean NLL) over non-overlapping windows of block_size tokens (0 windows = all).

    Under data parallelism rank r takes windows r, r + world_size, ...; every rank runs the same number of
    batches and forwards (a rank one window short runs a window it does not count), which a sharded (FSDP) model
    needs. should_stop() is called before every batch (the same number of times on every rank, so it may be a
    collective); it raises to abandon the evaluation.
    """
    seq = block_size
    total = len(tokens) // seq
    n = total if windows <= 0 else min(windows, total)
    if n == 0:
        raise UserError(f"WikiText-2 holds {len(tokens)} tokens, not one window of {seq}")
    mine = list(range(rank, n, world_size))
    ctx = ctx or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # NLL sum, token count
    bar = cli.Progress(len(mine), "wikitext-2", unit="window", enabled=progress)
    for i in range(0, -(-n // world_size), batch_size):  # as many batches on every rank
        if should_stop is not None:
            should_stop()
        counted = mine[i:i + batch_size]
        idx = torch.tensor(counted or [0], dtype=torch.long)
        win = tokens[(idx[:, None] * seq + torch.arange(seq)).reshape(-1)].reshape(len(idx), seq).to(device)
        with ctx:
            nll = _nll_sum(model, win[:, :-1], win[:, 1:]).double()
        if counted:
            sums[0] += nll
            sums[1] += win[:, 1:].numel()
        bar.update(len(counted))
    bar.close()
    model.train(was_training)
    sums = _all_reduce_sum(sums)
    return math.exp(float(sums[0] / sums[1]))


MAX_EVAL_WINDOW = 4096  # the default evaluation window is the model's context, at most this


def eval_window(model, requested=0) -> int:
    """The evaluation window (WikiText-2 and C4 validation): requested, or the model's context up to 4096."""
    context = model.config.block_size
    if requested > context:
        raise UserError(f"--eval_block_size {requested} exceeds the model's context {context}: use {context} or less")
    return requested or min(context, MAX_EVAL_WINDOW)


VAL_WINDOWS_PER_ITER = 8  # the C4 validation set is eval_iters x 8 windows, whatever the micro-batch size


@torch.no_grad()
def validation_loss(model, dataset: BinDataset, batch_size, eval_iters, device="cpu", ctx=None, rank=0,
                    world_size=1, seed=0, should_stop=None, progress=False):
    """Mean next-token CE of the student on eval_iters x VAL_WINDOWS_PER_ITER fixed validation windows.

    The windows depend only on the data, eval_iters and seed: batch_size only sets how many go through the
    model at once (fitting memory does not change the validation set). Ranks take every world_size-th window and
    run the same number of batches and forwards, as wikitext_perplexity; should_stop as there.
    """
    offsets = eval_offsets(len(dataset), dataset.block_size, VAL_WINDOWS_PER_ITER, eval_iters, seed).reshape(-1)
    mine = offsets[rank::world_size]
    ctx = ctx or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    bar = cli.Progress(len(mine), "C4 validation", unit="window", enabled=progress)
    for i in range(0, -(-len(offsets) // world_size), batch_size):  # as many batches on every rank
        if should_stop is not None:
            should_stop()
        counted = mine[i:i + batch_size]
        x, y = dataset.get_batch(counted if len(counted) else offsets[:1], device)
        with ctx:
            nll = _nll_sum(model, x, y).double()
        if len(counted):  # else a forward the sharded peers run too, not counted
            sums[0] += nll
            sums[1] += y.numel()
        bar.update(len(counted))
    bar.close()
    model.train(was_training)
    sums = _all_reduce_sum(sums)
    return float(sums[0] / sums[1])


def sparsity_report(model, all_reduce_sum=None):
    """What the model is, read off the model itself (never off the flags that made it).

    nm_ok / sparse_layers / mean_sparsity: check_nm over the sparse layers (None / 0 when dense); pattern: "2:4",
    "unstructured 0.5" (per row), "unstructured_layer 0.5" or "dense"; slorb_k (0 = none) and whether its
    projection is trained; params: every parameter once (tied ones once); params_nonzero: params less the
    pruned weights (the paper's "Parameters" column); slorb_params: S (and a stored X); dense_param_share: the
    share of params stored dense (everything outside the masked weights: embeddings, norms, head, biases, SLoRB).
    all_reduce_sum: for a sharded (FSDP) model, where each rank holds some rows of every mask, a function summing
    a tensor over the ranks: the counts and the verdict are then the whole model's.
    """
    ok, rows = check_nm(model)
    layers = [layer for _, layer in sparse_layers(model)]
    params = sum(p.numel() for p in model.parameters())  # a DTensor counts its whole (global) size
    masked = sum(layer.weight.numel() for layer in layers)
    pruned = sum(int((~layer.mask).sum()) for layer in layers if layer.sparse)
    if all_reduce_sum is not None and rows:
        zeros = [r["sparsity"] * local(layer.weight).numel() for r, layer in zip(rows, layers)]
        sums = all_reduce_sum(torch.tensor([pruned, float(not ok), *zeros], dtype=torch.float64))
        pruned, ok = int(sums[0]), bool(sums[1] == 0)
        for r, layer, z in zip(rows, layers, sums[2:].tolist()):
            r["sparsity"] = z / layer.weight.numel()
            if "nm_ok" in r:
                r["nm_ok"] = ok
    slorb = sum(layer.slorb_S.numel() + (layer.slorb_X.numel() if layer.slorb_X is not None else 0)
                for layer in layers if layer.slorb_S is not None)
    patterns = sorted({f"{layer.n}:{layer.m}" if layer.mask_type == "structured"
                       else f"{layer.mask_type} {layer.sparsity:g}" for layer in layers})
    slorb_ks = sorted({layer.slorb_k for layer in layers})
    report = {"family": getattr(model, "family", None), "pattern": " / ".join(patterns) or "dense",
              "slorb_k": slorb_ks[-1] if slorb_ks else 0,
              "trainable_projection": any(layer.trainable_projection for layer in layers if layer.slorb_k),
              "params": params, "params_nonzero": params - pruned, "slorb_params": slorb,
              "dense_param_share": (params - masked) / params if params else 0.0}
    if not rows:
        return {"nm_ok": None, "sparse_layers": 0, "mean_sparsity": 0.0, **report}
    return {"nm_ok": ok if any("nm_ok" in r for r in rows) else None, "sparse_layers": len(rows),
            "mean_sparsity": sum(r["sparsity"] for r in rows) / len(rows), **report}


def main(argv=None):
    from checkpoint import load_model

    p = cli.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--wikitext_dir", default="data/wikitext", help="folder with test.bin ('' to skip)")
    p.add_argument("--data_dir", default="", help="folder with val.bin for the C4 validation loss ('' to skip)")
    p.add_argument("--eval_block_size", "--block_size", type=int, default=0, dest="eval_block_size",
                   help=f"WikiText-2 window and C4 validation sequence length (0 = the model's context, at most "
                        f"{MAX_EVAL_WINDOW}: GPT-2 1024, OPT 2048, LLaMA-2 4096, SmolLM2 4096)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--eval_iters", type=int, default=100,
                   help=f"C4 validation set: eval_iters x {VAL_WINDOWS_PER_ITER} fixed windows, whatever --batch_size")
    p.add_argument("--ppl_windows", type=int, default=0, help="first N WikiText-2 windows only (0 = all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_threads", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t0 = time.time()
    model = load_model(args.model)
    block_size = eval_window(model, args.eval_block_size)
    model.to(args.device).eval()
    result = {"model": args.model, "eval_block_size": block_size, **sparsity_report(model)}
    if args.wikitext_dir:
        tokens = load_wikitext_tokens(args.wikitext_dir, "test", prepare_flag(args.model))
        check_wikitext(args.wikitext_dir, tokens, model)
        result["wikitext_ppl"] = wikitext_perplexity(model, tokens, block_size, args.ppl_windows, args.batch_size,
                                                     args.device, progress=True)
        result["ppl_windows"] = args.ppl_windows
    if args.data_dir:
        val = BinDataset(os.path.join(args.data_dir, "val.bin"), block_size, prepare_flag(args.model))
        val = val.check_model(model)
        result["val_loss"] = validation_loss(model, val, args.batch_size, args.eval_iters, args.device,
                                             progress=True)
    result["eval_seconds"] = round(time.time() - t0, 2)
    print(json.dumps(result, indent=2))
    if args.out:
        cli.write_json(args.out, result)
    return result


if __name__ == "__main__":
    cli.run(main)
