r"""One-shot pruning baselines (no training): magnitude, Wanda and SparseGPT, to N:M or unstructured sparsity.

    python prune.py --model gpt2 --method sparsegpt --n 2 --m 4 \
        --calibration data/c4_dataset/calibration_n128_len1024_seed0.pt --out out/sparsegpt.pt

Wanda and SparseGPT run as their published code does: the calibration windows go through the model block
by block; each block's four linears (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are pruned from the
inputs captured in ONE dense forward of that block (so attn.c_proj and the MLP linears see inputs made by the
still-dense earlier linears of the same block), then the block's outputs are recomputed with the pruned block
and become the next block's inputs. Later blocks therefore see the errors of the already-pruned earlier
blocks. Only one block's activations (nsamples, seqlen, n_embd) are held at a time. Magnitude needs no data.

The result carries real SparseLinear masks (check_nm verifies them) and the pruned weights are exactly zero;
SparseGPT also updates the kept weights (error compensation). --n counts the weights KEPT per group of --m
(the published scripts' prune_n counts the pruned ones: the same for 2:4). A `.pt` output is a checkpoint
that main.py `--init_from` and evaluate.py read; a folder output is a Hugging Face GPT2LMHeadModel folder
(see export.py).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import cli
import families
from checkpoint import load_model, model_state, save_checkpoint
from cli import UserError
from data.loader import BinDataset, check_tokenizer, check_wikitext, load_calibration, load_wikitext_tokens
from evaluate import sparsity_report, validation_loss, wikitext_perplexity
from sparsity import check_pattern, collect_input_norms, nm_mask, sparse_layers, sparsify, unstructured_mask

METHODS = ("magnitude", "wanda", "sparsegpt")
# Where each method ranks weights when pruning to an unstructured --sparsity, as in its published code:
# magnitude per layer, Wanda per output row, SparseGPT per block of 128 columns (hence per layer too).
UNSTRUCTURED_SCOPE = {"magnitude": "unstructured_layer", "wanda": "unstructured", "sparsegpt": "unstructured_layer"}


# ------------------------------------------------------------------------------------------------ SparseGPT
@torch.no_grad()
def sparsegpt_layer(weight, H, n=2, m=4, sparsity=0.0, blocksize=128, percdamp=0.01):
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
                keep1[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2, n, m)
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


class HessianHook:
    """Accumulates H = (2 / nsamples) Σ_tokens x xᵀ of a layer's inputs, averaged as published (running mean
    over calibration sequences, so H does not grow with the data)."""

    def __init__(self, layer):
        self.H = torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)
        self.nsamples = 0
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, layer, inputs):
        x = inputs[0].detach()
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.t() @ x


# ------------------------------------------------------------------------------------------------ the model
@torch.no_grad()
def embed(model, tokens, batch_size):
    """Block 0's inputs for every calibration window: token + position embeddings, (nsamples, seqlen, C)."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    return torch.cat([model.transformer.wte(tokens[i:i + batch_size]) + model.transformer.wpe(pos)
                      for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def run_block(block, x, batch_size):
    """Replace x (nsamples, seqlen, C) by block(x), batch by batch, in place (each row depends only on itself)."""
    for i in range(0, len(x), batch_size):
        x[i:i + batch_size] = block(x[i:i + batch_size])
    return x


@torch.no_grad()
def prune_model(model, method, n=2, m=4, sparsity=0.0, tokens=None, batch_size=8, blocksize=128,
                percdamp=0.01, progress=None):
    """Prune a dense GPT in place with magnitude, Wanda or SparseGPT; returns the model with SparseLinear masks.

    tokens: (nsamples, seqlen) calibration windows on the model's device (not needed for magnitude).
    sparsity > 0 selects unstructured pruning at that sparsity instead of n:m.
    progress: show the per-block progress bar (None = when stderr is a terminal).
    """
    from tqdm import tqdm

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    mask_type = "structured" if sparsity == 0 else UNSTRUCTURED_SCOPE[method]
    metric = "wanda" if method == "wanda" else "magnitude"
    model.eval()
    if method != "magnitude" and model.family != "gpt2":
        raise UserError(f"--method {method} runs block by block on GPT-2 models only so far; "
                        f"for {model.family} use --method magnitude")
    # Masks start all-ones (init_masks=False) and are set block by block below; magnitude sets them all now.
    sparsify(model, n=n, m=m, metric=metric, mask_type=mask_type, sparsity=sparsity,
             filter_fn=families.sparse_filter(model), init_masks=method == "magnitude")
    if method != "magnitude":
        if tokens is None:
            raise UserError(f"--method {method} needs calibration data (--calibration FILE)")
        x = embed(model, tokens, batch_size)
        disable = None if progress is None else not progress  # tqdm's None: hide the bar off a terminal
        for block in tqdm(model.transformer.h, desc=f"{method} blocks", disable=disable):
            layers = sparse_layers(block)
            if method == "wanda":
                with collect_input_norms(block):  # Σ x_j² of every linear of this block, one dense forward
                    for i in range(0, len(x), batch_size):
                        block(x[i:i + batch_size])
                for _, layer in layers:
                    layer.init_mask_and_slorb()
            else:
                hooks = {name: HessianHook(layer) for name, layer in layers}
                for i in range(0, len(x), batch_size):
                    block(x[i:i + batch_size])
                for name, layer in layers:
                    hooks[name].handle.remove()
                    new, keep = sparsegpt_layer(layer.weight, hooks[name].H, n, m, sparsity, blocksize, percdamp)
                    del hooks[name]
                    layer.weight.copy_(new)
                    layer.mask.copy_(keep)
                    layer.init_mask.copy_(keep)
            run_block(block, x, batch_size)  # the pruned block's outputs feed the next block
    for _, layer in sparse_layers(model):
        layer.weight.mul_(layer.mask)  # pruned weights exactly zero, whatever the method
    return model


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    p = cli.ArgumentParser(prog="prune.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dense model: a Hugging Face folder (gpt2, opt, llama, mistral, "
                                                  "qwen2), a GPT-2 name (gpt2, ...) or a dense checkpoint .pt")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="magnitude (|W|, no data); wanda (|W|·||X_j||, statistics block by block from the "
                        "already-pruned earlier blocks, as published); sparsegpt (OBS with error "
                        "compensation, block by block, as published)")
    p.add_argument("--n", type=int, default=2, help="keep n of every m consecutive input weights")
    p.add_argument("--m", type=int, default=4, help="group size of the n:m pattern")
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="> 0: unstructured pruning at this sparsity instead of n:m (ranked per layer for "
                        "magnitude, per output row for wanda, per block of columns for sparsegpt)")
    p.add_argument("--calibration", default="", help="calibration file from prepare_calibration_data.py "
                                                     "(needed by wanda and sparsegpt)")
    p.add_argument("--nsamples", type=int, default=0, help="use only the first N calibration windows (0 = all)")
    p.add_argument("--block_size", type=int, default=1024,
                   help="calibration windows and WikiText windows are cropped to this and to the model's context")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT: columns per lazy-update block")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT: dampening, fraction of mean diag(H)")
    p.add_argument("--out", default="", help="a .pt path writes a checkpoint (main.py --init_from, evaluate.py); "
                                             "any other path writes a Hugging Face GPT-2 folder")
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
    if args.method != "magnitude" and not args.calibration:
        raise UserError(f"--method {args.method} needs --calibration FILE: make one with "
                        "`python prepare_calibration_data.py --input C4_FILES`")
    if args.sparsity == 0 and args.method == "sparsegpt" and args.blocksize % args.m:
        raise UserError(f"--blocksize {args.blocksize} must be a multiple of --m {args.m}")
    if min(args.batch_size, args.blocksize, args.block_size) < 1 or args.nsamples < 0 or args.percdamp < 0:
        raise UserError("--batch_size, --blocksize and --block_size must be >= 1; --nsamples, --percdamp >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t0 = time.time()
    # every input is read before the model is pruned: a wrong path fails fast, not after the work
    tokens = meta = None
    if args.method != "magnitude":
        tokens, meta = load_calibration(args.calibration)
        if args.nsamples > len(tokens):
            raise UserError(f"--nsamples {args.nsamples} but {args.calibration} holds only {len(tokens)} windows")
        tokens = tokens[:args.nsamples or len(tokens)]
    wikitext = load_wikitext_tokens(args.wikitext_dir, "test") if args.wikitext_dir else None
    model = load_model(args.model)
    if sparse_layers(model):
        raise UserError(f"{args.model} is already sparse: prune.py starts from a dense model")
    if tokens is not None:
        check_tokenizer(meta, model, args.calibration)
    if wikitext is not None:
        check_wikitext(args.wikitext_dir, wikitext, model)
    block_size = min(args.block_size, model.config.block_size)
    val = BinDataset(os.path.join(args.data_dir, "val.bin"), block_size).check_model(model) if args.data_dir else None
    model.to(args.device)
    if tokens is not None:
        tokens = tokens[:, :block_size].to(args.device)  # windows longer than the context are cropped
    try:
        prune_model(model, args.method, args.n, args.m, args.sparsity, tokens, args.batch_size, args.blocksize,
                    args.percdamp)
    except ValueError as e:  # a pattern that does not fit the model's widths
        raise UserError(str(e)) from None
    prune_seconds = time.time() - t0
    report = sparsity_report(model)
    result = {"model": args.model, "method": args.method, "training": False, "tokens": 0,
              "pattern": f"{args.n}:{args.m}" if args.sparsity == 0 else f"unstructured {args.sparsity}",
              "n": args.n, "m": args.m, "sparsity": args.sparsity, **report,
              "calibration": args.calibration or None, "nsamples": None if tokens is None else len(tokens),
              "seqlen": None if tokens is None else tokens.shape[1],
              "prune_seconds": round(prune_seconds, 2), "block_size": block_size}
    if args.method == "sparsegpt":
        result.update(blocksize=args.blocksize, percdamp=args.percdamp)
    print(f"{args.method} {result['pattern']}: {report['sparse_layers']} layers, mean sparsity "
          f"{report['mean_sparsity']:.4f}, N:M ok {report['nm_ok']}, {prune_seconds:.1f} s")
    if args.out:
        if args.out.endswith(".pt"):
            save_checkpoint({**model_state(model), "prune": {**result, "calibration_meta": meta}}, args.out)
        else:
            from export import export_model
            export_model(model, args.out, tokenizer_dirs=[args.tokenizer_dir, args.model],
                         source=f"prune.py --method {args.method} --model {args.model}")
        result["out"] = args.out
        print(f"wrote {args.out}")
    model.eval()
    if wikitext is not None:
        result["wikitext_ppl"] = wikitext_perplexity(model, wikitext, block_size, args.ppl_windows, args.batch_size,
                                                     args.device, progress=sys.stderr.isatty())
        result["ppl_windows"] = args.ppl_windows
        print(f"wikitext-2 ppl {result['wikitext_ppl']:.2f}")
    if val is not None:
        result["val_loss"] = validation_loss(model, val, args.batch_size, args.eval_iters, args.device)
        print(f"C4 val loss {result['val_loss']:.4f}")
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    cli.run(main)
