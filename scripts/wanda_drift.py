"""Our Wanda (prune.py) against the published Wanda code on the same calibration windows: WikiText-2 perplexity of
each side and the share of weights that one side keeps and the other prunes, block by block (docs/oneshot.md,
"Wanda against its published code").

    git clone https://github.com/locuslab/wanda PATH/wanda      # the published code; nothing of it is copied here
    python scripts/wanda_drift.py --model MODEL --calibration C0.pt C1.pt C2.pt --published_dir PATH/wanda \
        --wikitext_dir DIR --windows 32 --eval_block_size 1024

Sides, per calibration file (prepare_calibration_data.py, the model's tokenizer):
  published: lib/prune.py's prune_wanda imported from --published_dir, 2:4, run as published except where it needs
    the hub or a GPU: its C4 loader is replaced by the file's windows (one per forward, as it feeds them), its
    device is the CPU, and transformers >= 5 decoder layers, which take the rotary embeddings as an argument its
    code predates, get them from the model's own rotary module (a pre-hook; the values the model passes them).
  ours, one run per --ours variant: prune.prune_model(method="wanda") as prune.py runs it, with bB = B windows per
    forward (prune.py's --batch_size; 8 is its default); with "-mean", the activation statistic accumulated as
    the published code does (a running mean over forwards of ||x_j||², instead of our sum of x_j² over tokens);
    with "-topk", a score tie in a 2:4 group broken as the published code's torch.topk(largest=False) breaks it
    (instead of --tie_break high). Measurement-only changes, made here by replacing prune.py's
    collect_input_norms and sparsity.nm_mask while that run prunes. Example: b1-mean-topk.
Without --published_dir only our variants run (their differences are then measured against the first variant).

Both sides' pruned models are evaluated by the same function (evaluate.wikitext_perplexity). A weight's decision
is read from the pruned weights (kept = non-zero), so a weight that was already zero counts as pruned on both
sides. Needs only the CPU; the test suite does not use this script.
"""
import contextlib
import copy
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import families  # noqa: E402
import prune  # noqa: E402
from checkpoint import load_model  # noqa: E402
from data.loader import check_wikitext, load_calibration, load_wikitext_tokens  # noqa: E402
from evaluate import eval_window, wikitext_perplexity  # noqa: E402
import sparsity  # noqa: E402
from sparsity import dense_forward, observe_inputs, sparse_layers  # noqa: E402
from tie_rules import keep_mask  # noqa: E402


# ------------------------------------------------------------------------------------------------ the two sides
def running_mean_norms(seqlen):
    """A stand-in for sparsity.collect_input_norms that accumulates the statistic as the published code does:
    after each forward of b windows, stat = stat·k/(k+b) + ||x_j||²/(k+b) with k windows seen before (a mean
    over windows of Σ_tokens x_j²; the scale is the same for every j, so only the rounding differs from ours)."""
    seen = {}

    def accumulate(layer, x, expert):
        windows = len(x) // seqlen
        k = seen.get(id(layer), 0)
        seen[id(layer)] = k + windows
        layer.input_sq.mul_(k / (k + windows))
        layer.input_sq.add_(torch.linalg.vector_norm(x.float(), dim=0) ** 2 / (k + windows))

    def collect(model):
        for _, layer in sparse_layers(model):
            layer.input_sq.zero_()
        with dense_forward(model), torch.no_grad(), observe_inputs(model, accumulate):
            yield model

    return contextlib.contextmanager(collect)


def parse_variant(variant):
    """'b8-mean' -> (8, ['mean']); a malformed variant is a one-line error."""
    batch, *changes = variant.split("-")
    if not batch.startswith("b") or not batch[1:].isdigit() or int(batch[1:]) < 1 or \
            not set(changes) <= {"mean", "topk"}:
        raise cli.UserError(f"--ours {variant!r}: write bB, optionally with -mean and/or -topk (B >= 1 windows per "
                            "forward)")
    return int(batch[1:]), changes


def prune_ours(base, tokens, variant):
    """A copy of base pruned by prune.prune_model (Wanda 2:4) under a variant bB[-mean][-topk] (module docstring)."""
    batch, changes = parse_variant(variant)
    model = copy.deepcopy(base)
    saved = prune.collect_input_norms, sparsity.nm_mask
    if "mean" in changes:
        prune.collect_input_norms = running_mean_norms(tokens.shape[1])
    if "topk" in changes:  # SparseLinear.compute_mask calls sparsity.nm_mask; scores are >= 0, so |scores| = scores
        sparsity.nm_mask = lambda scores, n, m, ties: keep_mask(scores, "topk", n, m)
    try:
        prune.prune_model(model, "wanda", 2, 4, 0.0, tokens, batch, progress=False)
    finally:
        prune.collect_input_norms, sparsity.nm_mask = saved
    return model


def import_published(published_dir):
    """The published code's lib/prune.py as a module (its lib/data.py imports `datasets`, never called here)."""
    if not os.path.isfile(os.path.join(published_dir, "lib", "prune.py")):
        raise cli.UserError(f"--published_dir {published_dir}: no lib/prune.py there; pass a checkout of "
                            "https://github.com/locuslab/wanda")
    sys.path.insert(0, os.path.abspath(published_dir))
    from lib import prune as published
    return published


def prune_published(published, base, tokens):
    """A copy of base's transformers model pruned by the published prune_wanda (2:4) on the windows in tokens."""
    hf = copy.deepcopy(base.hf)
    hf.seqlen, hf.hf_device_map = tokens.shape[1], {}
    windows = [(tokens[i:i + 1], None) for i in range(len(tokens))]
    args = types.SimpleNamespace(nsamples=len(tokens), seed=0, use_variant=False, sparsity_ratio=0.5)
    rotary = hf.model.rotary_emb

    def pass_rotary(layer, args_, kwargs):
        if kwargs.get("position_embeddings") is None and "position_ids" in kwargs:
            kwargs = {**kwargs, "position_embeddings": rotary(args_[0], kwargs["position_ids"])}
        return args_, kwargs

    handles = [layer.register_forward_pre_hook(pass_rotary, with_kwargs=True) for layer in hf.model.layers]
    saved = published.get_loaders
    published.get_loaders = lambda *a, **k: (windows, None)
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # a line per layer
            published.prune_wanda(args, hf, None, torch.device("cpu"), prune_n=2, prune_m=4)
    finally:
        published.get_loaders = saved
        for h in handles:
            h.remove()
    del hf.seqlen, hf.hf_device_map
    return families.HFCausalLM(hf)


# ------------------------------------------------------------------------------------------------ comparison
def kept_by_block(model):
    """{block index: [bool kept (weight != 0) of each of the block's linears, in name order]}."""
    blocks = {}
    for name, module in sorted(model.named_modules()):
        name = families.hf_name(model, name)
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and "layers" in parts:
            blocks.setdefault(int(parts[parts.index("layers") + 1]), []).append(module.weight.detach() != 0)
    return blocks


def differing(a, b):
    """Per block, the share of weights kept by one model and pruned by the other; and over all blocks."""
    ka, kb = kept_by_block(a), kept_by_block(b)
    per_block, diff, total = [], 0, 0
    for i in sorted(ka):
        d = sum(int((x != y).sum()) for x, y in zip(ka[i], kb[i]))
        n = sum(x.numel() for x in ka[i])
        per_block.append(d / n)
        diff, total = diff + d, total + n
    return per_block, diff / total


def boundary_score_ties(base, model, n=2, m=4):
    """How many n:m groups of model's layers have their n-th and (n+1)-th largest Wanda score exactly equal (and
    non-zero): where the tie rule alone decides. Scores from base's dense weights and model's statistics."""
    dense = dict(base.named_modules())
    ties = 0
    for name, layer in sparse_layers(model):
        scores = sparsity.wanda_scores(dense[name].weight.detach().float(), layer.input_sq.sqrt())
        top = scores.reshape(-1, m).sort(dim=1, descending=True).values
        ties += int(((top[:, n - 1] == top[:, n]) & (top[:, n] > 0)).sum())
    return ties


def main(argv=None):
    p = cli.ArgumentParser(prog="wanda_drift.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a dense model (folder, .gguf, hub id)")
    p.add_argument("--calibration", nargs="+", required=True, help="calibration files, one run per file")
    p.add_argument("--published_dir", default="", help="a checkout of github.com/locuslab/wanda ('' = ours only)")
    p.add_argument("--ours", default="b8", help="comma-separated variants of ours: bB[-mean][-topk] (see above)")
    p.add_argument("--wikitext_dir", required=True, help="test.bin made with the model's tokenizer")
    p.add_argument("--windows", type=int, default=32, help="first N WikiText-2 windows")
    p.add_argument("--eval_block_size", type=int, default=1024, help="WikiText-2 window length")
    p.add_argument("--eval_batch_size", type=int, default=8, help="windows per evaluation forward (prune.py's 8)")
    p.add_argument("--results", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    for variant in args.ours.split(","):  # before minutes of pruning
        parse_variant(variant)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    published = import_published(args.published_dir) if args.published_dir else None
    wikitext = load_wikitext_tokens(args.wikitext_dir)
    base = load_model(args.model)
    check_wikitext(args.wikitext_dir, wikitext, base)
    window = eval_window(base, args.eval_block_size)

    def ppl(model):
        return wikitext_perplexity(model, wikitext, window, args.windows, args.eval_batch_size)

    results = []
    for path in args.calibration:
        tokens, meta = load_calibration(path)
        runs, ties = {}, {}
        if published is not None:
            t0 = time.process_time()
            runs["published"] = prune_published(published, base, tokens)
            print(f"{path}: published pruned in {time.process_time() - t0:.0f} s of CPU", flush=True)
        for variant in args.ours.split(","):
            t0 = time.process_time()
            model = runs["ours " + variant] = prune_ours(base, tokens, variant)
            seconds = time.process_time() - t0
            ties["ours " + variant] = boundary_score_ties(base, model)
            print(f"{path}: ours {variant} pruned in {seconds:.0f} s of CPU; {ties['ours ' + variant]} groups with "
                  "an exact score tie at the 2:4 boundary", flush=True)
        reference = next(iter(runs))
        row = {"calibration": path, "seed": meta.get("seed"), "reference": reference, "runs": {}}
        for label, model in runs.items():
            run = {"score_ties": ties[label]} if label in ties else {}
            if label != reference:
                run["differing_per_block"], run["differing"] = differing(model, runs[reference])
            # the same pruned weights give the same perplexity: not evaluated twice
            same = label != reference and run["differing"] == 0
            run["wikitext_ppl"] = row["runs"][reference]["wikitext_ppl"] if same else ppl(model)
            row["runs"][label] = run
            first = next((i for i, d in enumerate(run.get("differing_per_block", [])) if d), None)
            print(f"seed {row['seed']} {label}: wikitext-2 ppl {run['wikitext_ppl']:.2f}"
                  + (f"; vs {reference}: {run['differing']:.4%} of weights differ, first in block {first}, "
                     "per block " + " ".join(f"{d:.4f}" for d in run["differing_per_block"])
                     if label != reference else ""), flush=True)
        results.append(row)
        del runs
    if args.results:
        cli.write_json(args.results, results)
    return results


if __name__ == "__main__":
    cli.run(main)
