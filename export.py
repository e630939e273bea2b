"""Export a checkpoint to a Hugging Face folder of the model's own transformers class (GPT2LMHeadModel,
OPTForCausalLM, LlamaForCausalLM, ...) that `transformers` loads with no custom code.

    python export.py --checkpoint out/ast_boosted/best.pt --out out/ast_boosted_hf --verify_ppl_windows 8

The folder holds config.json + model.safetensors (the effective weights W ⊙ M: pruned weights are exactly
zero; GPT-2 in its Conv1D layout), the tokenizer (copied from the model's own folder) and sparse_export.json
(pattern, sparse layers, where the tokenizer came from). After writing, the folder is reloaded with
transformers' AutoModelForCausalLM; every block linear is checked to be exactly N:M and the logits (and with
--verify_ppl_windows the WikiText-2 perplexity) are compared with the checkpoint's.

SLoRB (AST-Boosted): S X is a dense (out, in) matrix and cannot live inside a 2:4 weight. By default it is kept
as a separate branch in slorb.safetensors; transformers alone then loads only the 2:4 part, and
`checkpoint.load_model(folder)` (what evaluate.py, main.py and prune.py use) rebuilds the full model.
--merge_slorb instead writes W ⊙ M + S X: a dense-equivalent model that is no longer N:M.
"""
import argparse
import json
import os
import shutil
import sys

import torch

import cli
import families
from checkpoint import EXPORT_INFO, SLORB_FILE, load_model, tokenizer_info
from cli import UserError
from data.tokenizer import TOKENIZER_FILES, gpt2_fingerprint, has_hf_tokenizer, hf_tokenizer, prepare_flag
from sources import MODEL_HELP, resolve
from sparsity import SparseExpertWeight, layer_args, nm_violations, sparse_layers

# OpenAI's encoder.json / vocab.bpe hold the GPT-2 BPE under other names: copied as vocab.json / merges.txt.
OPENAI_GPT2_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}


# ------------------------------------------------------------------------------------------------ writing
@torch.no_grad()
def plain_state_dict(model, merge_slorb=False) -> dict:
    """The model's state dict as plain nn.Linear layers hold it: block weights are the effective W ⊙ M (+ S X
    when merging); masks, Wanda statistics and SLoRB tensors are left out."""
    sparse = dict(sparse_layers(model))
    skip = ("mask", "init_mask", "input_sq", "slorb_S", "slorb_X")
    sd = {}
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in sparse and leaf in skip:
            continue
        if owner in sparse and leaf == "weight":
            layer = sparse[owner]
            v = layer.weight * layer.mask
            if merge_slorb:
                v = v + layer.slorb_delta()
            if isinstance(layer, SparseExpertWeight):
                k = owner  # the experts module's own Parameter name (sparsity.SparseExpertWeight)
        sd[k] = v.detach().float().clone()
    return sd


def find_tokenizer(candidates):
    """The first candidate (a folder, model name, .gguf file or hub id) holding a tokenizer: (folder, {name in the
    export: file there}), (the .gguf file, None) when it stores the tokenizer inside, or (None, None)."""
    for candidate in candidates:
        try:
            source = resolve(candidate, "the tokenizer source") if candidate else None
        except UserError:  # a recorded hub id that is no longer cached: look further
            continue
        if source and source.gguf_file:
            return source.name, None
        folder = source and source.path
        if not folder or not os.path.isdir(folder):
            continue
        if has_hf_tokenizer(folder):
            return folder, {f: f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))}
        if all(os.path.isfile(os.path.join(folder, f)) for f in OPENAI_GPT2_FILES.values()):
            return folder, dict(OPENAI_GPT2_FILES)
    return None, None


def default_tokenizer_dirs(model):
    """The shared GPT-2 tokenizer, for models known to use GPT-2's BPE (never guessed for other tokenizers)."""
    fp = tokenizer_info(model)["fingerprint"]
    if model.family != "gpt2" and (fp is None or fp != gpt2_fingerprint()):
        return []
    root = os.path.join(cli.default_data_root(), "gpt2_tokenizer")
    return [os.path.join(root, "hf"), root]


@torch.no_grad()
def export_model(model, out, tokenizer_dirs=(), merge_slorb=False, source=""):
    """Write `model` (any family, sparse or not) as a Hugging Face folder; returns what sparse_export.json records.

    tokenizer_dirs: folders (or model names) searched in order for the tokenizer, then the model's own tokenizer
    folder, then (GPT-2 tokenizers only) the shared data folder.
    """
    layers = sparse_layers(model)
    has_slorb = any(layer.slorb_S is not None for _, layer in layers)
    slorb_mode = None if not has_slorb else ("merged" if merge_slorb else "separate")
    os.makedirs(out, exist_ok=True)
    families.save_pretrained(model, out, plain_state_dict(model, merge_slorb=merge_slorb))

    stale = os.path.join(out, SLORB_FILE)
    if os.path.exists(stale):
        os.remove(stale)  # a previous export into this folder must not be picked up by the loader
    if slorb_mode == "separate":
        from safetensors.torch import save_file

        tensors = {}
        for name, layer in layers:
            key = families.hf_name(model, name)
            tensors[f"{key}.slorb_S"] = layer.slorb_S.detach().float().cpu().contiguous()
            if layer.slorb_X is not None:  # a learned (or xavier) projection; else the fixed block indicator
                tensors[f"{key}.slorb_X"] = layer.slorb_X.detach().float().cpu().contiguous()
        save_file(tensors, os.path.join(out, SLORB_FILE), metadata={"format": "pt"})

    dirs = [d for d in tokenizer_dirs if d] + [tokenizer_info(model)["dir"]] + default_tokenizer_dirs(model)
    tok_dir, files = find_tokenizer(dirs)
    if tok_dir is not None and files is None:  # a .gguf file: transformers writes its tokenizer's files
        hf_tokenizer(tok_dir)[0].save_pretrained(out)
        print(f"tokenizer: written from {tok_dir}")
    elif tok_dir is not None:
        for ours, theirs in files.items():
            shutil.copyfile(os.path.join(tok_dir, theirs), os.path.join(out, ours))
        print(f"tokenizer: copied from {tok_dir}")
    else:
        print(f"warning: no tokenizer found (looked in {', '.join(d for d in dirs if d) or 'nothing'}); the "
              "folder has no tokenizer files: pass --tokenizer_dir", file=sys.stderr)

    args = layer_args(layers[0][1]) if layers else None
    structured = bool(layers) and args["mask_type"] == "structured"
    info = {
        "format": 2,
        "family": model.family,
        "source": source,
        "sparse_layers": [families.hf_name(model, name) for name, _ in layers] if slorb_mode != "merged" else [],
        "sparsity_args": args if slorb_mode != "merged" else None,
        "pattern": (f"{args['n']}:{args['m']}" if structured else args["mask_type"]) if layers else None,
        "nm_exact": structured and slorb_mode != "merged",
        "slorb": slorb_mode,
        "tokenizer": tok_dir,
    }
    if slorb_mode == "separate":
        info["note"] = ("model.safetensors holds only the sparse W*M; the SLoRB branch S X is in slorb.safetensors: "
                        "load the full model with checkpoint.load_model(folder)")
    elif slorb_mode == "merged":
        info["note"] = "--merge_slorb: weights are W*M + S X, dense-equivalent, NOT N:M sparse"
    with open(os.path.join(out, EXPORT_INFO), "w") as f:
        json.dump(info, f, indent=2)
    return info


# ------------------------------------------------------------------------------------------------ checking
def _rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class _TransformersLogits(torch.nn.Module):
    """A transformers model behind our forward(idx, targets) -> (logits, loss) signature (loss not computed)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx, targets=None):
        return self.hf(idx).logits, None


@torch.no_grad()
def verify_export(model, out, info, wikitext_tokens=None, ppl_windows=0, tol=1e-4):
    """Reload the folder with transformers (and our loader); check N:M and compare logits / perplexity."""
    from evaluate import wikitext_perplexity

    model.eval()
    hf = families.load_transformers(out)
    report = {"ok": True, "transformers_class": type(hf).__name__}
    if info["nm_exact"]:
        n, m = info["sparsity_args"]["n"], info["sparsity_args"]["m"]
        bad = {name: nm_violations(families.transformers_weight(hf, name), n, m) for name in info["sparse_layers"]}
        report["nm_violations"] = sum(bad.values())
        report["nm_ok"] = report["nm_violations"] == 0
        report["ok"] &= report["nm_ok"]
        print(f"N:M check after reloading with transformers ({type(hf).__name__}): {len(bad)} layers, "
              f"{report['nm_violations']} groups over {n}:{m} -> {'ok' if report['nm_ok'] else 'FAILED'}")
    elif info["slorb"] == "merged":
        print("NOTE: --merge_slorb: the export is dense-equivalent (W*M + S X), NOT N:M; N:M check skipped",
              file=sys.stderr)
    else:
        print(f"N:M check skipped: the model is {info['pattern'] or 'dense'}")
    # With a separate SLoRB branch transformers sees only W ⊙ M; the full model is our loader's.
    exported = load_model(out).eval() if info["slorb"] == "separate" else _TransformersLogits(hf)
    seq = min(64, model.config.block_size)
    idx = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    report["logits_rel_diff"] = _rel_diff(exported(idx, targets=idx)[0], model(idx, targets=idx)[0])
    report["ok"] &= report["logits_rel_diff"] <= tol
    via = "checkpoint.load_model" if info["slorb"] == "separate" else "transformers"
    print(f"logits of the export ({via}) vs the checkpoint: max relative difference "
          f"{report['logits_rel_diff']:.2e} (tolerance {tol:g})")
    if wikitext_tokens is not None and ppl_windows > 0:
        bs = model.config.block_size
        ref = wikitext_perplexity(model, wikitext_tokens, bs, ppl_windows)
        got = wikitext_perplexity(exported, wikitext_tokens, bs, ppl_windows)
        report.update(wikitext_ppl_checkpoint=ref, wikitext_ppl_export=got, ppl_windows=ppl_windows,
                      ppl_rel_diff=abs(got - ref) / ref)
        report["ok"] &= report["ppl_rel_diff"] <= tol
        print(f"WikiText-2 ppl over {ppl_windows} windows: checkpoint {ref:.4f}, export {got:.4f} "
              f"(relative difference {report['ppl_rel_diff']:.2e})")
    return report


# ------------------------------------------------------------------------------------------------ CLI
def checkpoint_model_dirs(ckpt):
    """Model folders a checkpoint records (main.py's student / init_from, prune.py's --model), for the tokenizer."""
    cfg, pruned = ckpt.get("config") or {}, ckpt.get("prune") or {}
    return [d for d in (cfg.get("student_model"), cfg.get("init_from"), pruned.get("model"))
            if isinstance(d, str) and d and d != "resume"]


def main(argv=None):
    from checkpoint import build_model, load_checkpoint
    from data.loader import load_wikitext_tokens

    p = cli.ArgumentParser(prog="export.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="main.py ckpt.pt / best.pt, a prune.py .pt, or any model: " + MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (a Hugging Face folder of the model's transformers class)")
    p.add_argument("--tokenizer_dir", default="",
                   help="copy the tokenizer files from here; default: the model folder the checkpoint records, "
                        "else (GPT-2 tokenizers) $SPARSE_GPT2_DATA/gpt2_tokenizer")
    p.add_argument("--merge_slorb", type=cli.parse_bool, default=False,
                   help="SLoRB checkpoints: merge S X into the weights (dense-equivalent, NO LONGER N:M); "
                        "default keeps SLoRB separate in slorb.safetensors")
    p.add_argument("--verify", type=cli.parse_bool, default=True,
                   help="reload with transformers, check N:M and compare logits with the checkpoint")
    p.add_argument("--verify_ppl_windows", type=int, default=0,
                   help="also compare WikiText-2 perplexity over this many windows (0 = skip)")
    p.add_argument("--wikitext_dir", default="data/wikitext", help="folder with test.bin, for --verify_ppl_windows")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise UserError(f"{args.out} exists and is not empty: pass --force to write into it")
    source = resolve(args.checkpoint, "--checkpoint")
    if os.path.isfile(source.path) and not source.gguf_file:
        ckpt = load_checkpoint(source.path)
        model, recorded = build_model(ckpt), checkpoint_model_dirs(ckpt)
    else:  # an export or Hugging Face folder, a .gguf file or a hub id (to re-export, or to export a dense model)
        model, recorded = load_model(args.checkpoint, what="--checkpoint"), []
    model.eval()
    info = export_model(model, args.out, [args.tokenizer_dir, *recorded], args.merge_slorb, source=source.name)
    if info["slorb"] == "separate":
        print("NOTE: this checkpoint has SLoRB; it is kept as a separate branch in slorb.safetensors (not merged "
              "into the 2:4 weights). transformers alone loads only the 2:4 part; the full model loads with "
              "checkpoint.load_model(folder), which evaluate.py, main.py and prune.py use. --merge_slorb True "
              "writes a dense-equivalent (not N:M) folder instead.", file=sys.stderr)
    print(f"wrote {args.out} (pattern {info['pattern']}, SLoRB {info['slorb'] or 'none'})")
    if not args.verify:
        return info
    wt = load_wikitext_tokens(args.wikitext_dir, "test", prepare_flag(args.checkpoint)) \
        if args.verify_ppl_windows > 0 else None
    report = verify_export(model, args.out, info, wt, args.verify_ppl_windows)
    if not report["ok"]:
        print("error: the export does not reproduce the checkpoint (see above): please report this as a bug",
              file=sys.stderr)
        sys.exit(1)
    return {**info, "verify": report}


if __name__ == "__main__":
    cli.run(main)
