"""How much the N:M tie rule matters: one-shot 2:4 magnitude pruning of a model under several tie rules, each
evaluated on the same WikiText-2 windows (docs/ties.md, "Ties at the N:M boundary").

    python data/wikitext/prepare.py --tokenizer MODEL --input ../shared/data/wikitext2 --out_dir data/wikitext_M
    python scripts/tie_rules.py --model MODEL --wikitext_dir data/wikitext_M --windows 32 --eval_block_size 1024

Rules: high / low (sparsity.nm_mask's two: of two equal |W| the higher or the lower input index is kept);
topk (the published Wanda/AST code's order: the two that torch.topk(largest=False) returns are pruned);
randomS (ties broken by a random order drawn with seed S: the spread of an arbitrary choice); dense (the model
unpruned). Also prints the share of groups with a tie at the boundary (the n-th and (n+1)-th largest |W| equal).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from checkpoint import load_model  # noqa: E402
from data.loader import check_wikitext, load_wikitext_tokens  # noqa: E402
from evaluate import eval_window, wikitext_perplexity  # noqa: E402
from families import sparse_filter  # noqa: E402
from sparsity import boundary_ties as group_ties, nm_mask, sparse_layers, sparsify  # noqa: E402


def keep_mask(weight, rule, n=2, m=4, generator=None):
    """The n:m magnitude mask of weight under a tie rule (see the module docstring); randomS draws from
    `generator` (seeded with S by the caller, one per rule, so that every layer gets its own draw)."""
    scores = weight.abs()
    if rule in ("high", "low"):
        return nm_mask(scores, n, m, rule)
    groups = scores.reshape(-1, m)
    if rule == "topk":
        pruned = torch.topk(groups, m - n, dim=1, largest=False).indices
        return torch.ones_like(groups, dtype=torch.bool).scatter_(1, pruned, False).reshape(weight.shape)
    if rule.startswith("random"):
        order = torch.argsort(torch.rand(groups.shape, generator=generator), dim=1)  # a random order within each group
        keep = nm_mask(torch.gather(groups, 1, order), n, m, "low")  # ties go to the earlier in that order
        return torch.zeros_like(keep).scatter_(1, order, keep).reshape(weight.shape)
    raise cli.UserError(f"unknown rule {rule!r}: high, low, topk or randomSEED")


def boundary_ties(layers, n=2, m=4):
    """Share of the n:m groups whose n-th and (n+1)-th largest |W| are equal."""
    ties = total = 0
    for layer in layers:
        tied = group_ties(layer.weight.detach().abs(), n, m)
        ties, total = ties + int(tied.sum()), total + tied.numel()
    return ties / total


def main(argv=None):
    p = cli.ArgumentParser(prog="tie_rules.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a dense model (folder, .gguf, hub id, checkpoint)")
    p.add_argument("--wikitext_dir", required=True, help="test.bin made with the model's tokenizer")
    p.add_argument("--rules", default="dense,high,low,topk,random0,random1,random2",
                   help="comma-separated; dense = no pruning")
    p.add_argument("--windows", type=int, default=32, help="first N WikiText-2 windows")
    p.add_argument("--eval_block_size", type=int, default=1024)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    tokens = load_wikitext_tokens(args.wikitext_dir, "test")
    model = load_model(args.model)
    check_wikitext(args.wikitext_dir, tokens, model)
    window = eval_window(model, args.eval_block_size)
    sparsify(model, filter_fn=sparse_filter(model), init_masks=False)
    layers = [layer for _, layer in sparse_layers(model)]
    result = {"model": args.model, "windows": args.windows, "eval_block_size": window,
              "boundary_tie_share": boundary_ties(layers), "ppl": {}}
    print(f"groups with a tie at the 2:4 boundary: {result['boundary_tie_share']:.4f}", flush=True)
    for rule in args.rules.split(","):
        if rule == "dense":  # masks all-ones
            result["ppl"]["dense"] = wikitext_perplexity(model, tokens, window, args.windows)
            print(f"dense: {result['ppl']['dense']:.2f}", flush=True)
            continue
        t0 = time.time()
        generator = torch.Generator().manual_seed(int(rule[len("random"):]) if rule.startswith("random") else 0)
        with torch.no_grad():
            for layer in layers:
                layer.mask.copy_(keep_mask(layer.weight.detach(), rule, generator=generator))
        result["ppl"][rule] = wikitext_perplexity(model, tokens, window, args.windows)
        print(f"{rule}: {result['ppl'][rule]:.2f} ({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        cli.write_json(args.out, result)
    return result


if __name__ == "__main__":
    cli.run(main)
