"""Evaluation: WikiText-2 perplexity by the paper's protocol and C4 validation loss, as functions and a CLI.

    python evaluate.py --model out/ast/ckpt.pt --wikitext_dir data/wikitext --data_dir data/c4_dataset

WikiText-2: the test split's tokens (prepared once by data/wikitext/prepare.py) are cut into
non-overlapping windows of min(1024, block_size) tokens, the tail dropped; ppl = exp(mean next-token NLL over
all windows). Under DDP each rank takes every world_size-th window and the sums are all-reduced.
"""
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
from cli import UserError
from data.loader import BinDataset, eval_offsets, load_wikitext_tokens
from model import GPT
from sparsity import check_nm


def _all_reduce_sum(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _nll_sum(model, x, y):
    if isinstance(model, GPT):  # the fused loss: the same value without materialising the logits
        return model(x, targets=y, return_logits=False)[1].double() * y.numel()
    logits, _ = model(x, targets=y)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")


@torch.no_grad()
def wikitext_perplexity(model, tokens, block_size, windows=0, batch_size=1, device="cpu", ctx=None,
                        rank=0, world_size=1, progress=False, should_stop=None):
    """exp(mean NLL) over non-overlapping windows of min(1024, block_size) tokens (0 windows = all).

    should_stop() is called before every batch (the same number of times on every rank, so it may be a
    collective); it raises to abandon the evaluation.
    """
    seq = min(1024, block_size)
    total = len(tokens) // seq
    n = total if windows <= 0 else min(windows, total)
    if n == 0:
        raise UserError(f"WikiText-2 holds {len(tokens)} tokens, not one window of {seq}")
    mine = list(range(rank, n, world_size))
    ctx = ctx or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # NLL sum, token count
    bar = _bar(len(mine), "wikitext-2", progress)
    for i in range(0, -(-n // world_size), batch_size):  # as many batches on every rank
        if should_stop is not None:
            should_stop()
        idx = torch.tensor(mine[i:i + batch_size], dtype=torch.long)
        if len(idx) == 0:
            continue
        win = tokens[(idx[:, None] * seq + torch.arange(seq)).reshape(-1)].reshape(len(idx), seq).to(device)
        with ctx:
            sums[0] += _nll_sum(model, win[:, :-1], win[:, 1:]).double()
        sums[1] += win[:, 1:].numel()
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    sums = _all_reduce_sum(sums)
    return math.exp(float(sums[0] / sums[1]))


VAL_WINDOWS_PER_ITER = 8  # the C4 validation set is eval_iters x 8 windows, whatever the micro-batch size


@torch.no_grad()
def validation_loss(model, dataset: BinDataset, batch_size, eval_iters, device="cpu", ctx=None, rank=0,
                    world_size=1, seed=0, should_stop=None):
    """Mean next-token CE of the student on eval_iters x VAL_WINDOWS_PER_ITER fixed validation windows.

    The windows depend only on the data, eval_iters and seed: batch_size only sets how many go through the
    model at once (fitting memory does not change the validation set). should_stop as in wikitext_perplexity.
    """
    offsets = eval_offsets(len(dataset), dataset.block_size, VAL_WINDOWS_PER_ITER, eval_iters, seed).reshape(-1)
    mine = offsets[rank::world_size]
    ctx = ctx or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, -(-len(offsets) // world_size), batch_size):  # as many batches on every rank
        if should_stop is not None:
            should_stop()
        if i >= len(mine):
            continue
        x, y = dataset.get_batch(mine[i:i + batch_size], device)
        with ctx:
            sums[0] += _nll_sum(model, x, y).double()
        sums[1] += y.numel()
    model.train(was_training)
    sums = _all_reduce_sum(sums)
    return float(sums[0] / sums[1])


def sparsity_report(model):
    """{'nm_ok', 'sparse_layers', 'mean_sparsity'} of the model's sparse layers (None entries when dense)."""
    ok, rows = check_nm(model)
    if not rows:
        return {"nm_ok": None, "sparse_layers": 0, "mean_sparsity": 0.0}
    return {"nm_ok": ok if any("nm_ok" in r for r in rows) else None, "sparse_layers": len(rows),
            "mean_sparsity": sum(r["sparsity"] for r in rows) / len(rows)}


def _bar(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def main(argv=None):
    from checkpoint import load_model

    p = cli.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint .pt, Hugging Face GPT-2 folder or model name")
    p.add_argument("--wikitext_dir", default="data/wikitext", help="folder with test.bin ('' to skip)")
    p.add_argument("--data_dir", default="", help="folder with val.bin for the C4 validation loss ('' to skip)")
    p.add_argument("--block_size", type=int, default=1024)
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
    block_size = min(args.block_size, model.config.block_size)
    model.to(args.device).eval()
    result = {"model": args.model, "block_size": block_size, **sparsity_report(model)}
    if args.wikitext_dir:
        tokens = load_wikitext_tokens(args.wikitext_dir, "test")
        result["wikitext_ppl"] = wikitext_perplexity(model, tokens, block_size, args.ppl_windows, args.batch_size,
                                                     args.device, progress=sys.stderr.isatty())
        result["ppl_windows"] = args.ppl_windows
    if args.data_dir:
        val = BinDataset(os.path.join(args.data_dir, "val.bin"), block_size)
        result["val_loss"] = validation_loss(model, val, args.batch_size, args.eval_iters, args.device)
    result["eval_seconds"] = round(time.time() - t0, 2)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    cli.run(main)
