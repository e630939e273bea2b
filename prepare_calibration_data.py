"""Cut the pruning calibration set: nsamples random windows of seqlen tokens from C4 train documents.

    python prepare_calibration_data.py --input ../shared/data/c4/en/c4-train.00000-of-01024.head1000.json.gz \
        --nsamples 64 --seqlen 1024 --seed 0 --out data/c4_dataset/calibration.pt

As Wanda and SparseGPT do: pick a random document; if it has more than seqlen tokens, take a random window of
seqlen tokens from it, else pick again. One difference, on purpose: documents are drawn without replacement, so the
windows come from nsamples distinct documents (never two windows of one document); when fewer documents are long
enough, the script says so instead of repeating them. The RNG is a local numpy Generator seeded with --seed (the
published script never applied its seed), and the same inputs and seed give a byte-identical file. Tokens are
tiktoken GPT-2's, or with --tokenizer MODEL (a folder, a .gguf file or a hub id) that model's own (each document
encoded as the published code does, with the tokenizer's own special tokens: for OPT and LLaMA a window that starts
at a document's first token begins with BOS). Load it with `data.loader.load_calibration(path)`.

All documents of the inputs are held in memory: pass one C4 shard, not many.
"""
import io
import os

import numpy as np
import torch

import cli
from cli import UserError
from data.c4_dataset.prepare import expand_inputs, read_documents, refuse_existing, sha256_file, temp_name
from data.tokenizer import TOKENIZER_DIR_HELP, get_tokenizer
from sources import TOKENIZER_HELP

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
METHOD = "one random window per distinct random document longer than seqlen (Wanda/SparseGPT style)"


def sample_windows(docs, encode, nsamples, seqlen, seed):
    """(nsamples, seqlen) int64 windows from distinct documents, in the order they were drawn."""
    rng = np.random.default_rng(seed)
    windows = []
    for i in rng.permutation(len(docs)):
        tokens = encode(docs[i])  # tokenise lazily: only the documents actually drawn
        if len(tokens) > seqlen:
            # Wanda's random.randint(0, len - seqlen - 1), inclusive, i.e. [0, len - seqlen)
            start = int(rng.integers(0, len(tokens) - seqlen))
            windows.append(tokens[start:start + seqlen])
            if len(windows) == nsamples:
                return np.array(windows, dtype=np.int64)
    raise UserError(f"only {len(windows)} of the {len(docs):,} input documents have more than {seqlen} tokens, "
                    f"but --nsamples {nsamples} needs that many distinct documents: add C4 files with --input, "
                    "or lower --nsamples or --seqlen")


def calibration_bytes(obj):
    # Serialise in memory: torch.save to a path would name the zip's inner folder after the file,
    # and the same seed must give the same bytes whatever the output is called.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", action="extend", nargs="+", default=[],
                   help="C4 train file, glob or folder (several allowed)")
    p.add_argument("--out", default=None,
                   help="output file (default data/c4_dataset/calibration_n{nsamples}_len{seqlen}_seed{seed}.pt)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, metavar="MODEL", help=TOKENIZER_HELP)
    p.add_argument("--tokenizer_dir", default=None, help="tiktoken gpt2 only: " + TOKENIZER_DIR_HELP)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    if not args.input:
        raise UserError("no input: pass --input C4_TRAIN_FILES")
    if args.nsamples < 1 or args.seqlen < 1:
        raise UserError(f"--nsamples and --seqlen must be at least 1, got {args.nsamples} and {args.seqlen}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.out is None:
        args.out = os.path.join(REPO_ROOT, "data", "c4_dataset",
                                f"calibration_n{args.nsamples}_len{args.seqlen}_seed{args.seed}.pt")
    return args


def main(argv=None):
    args = parse_args(argv)
    refuse_existing([args.out], args.force)
    files = expand_inputs(args.input, "--input")
    tok = get_tokenizer(args.tokenizer, args.tokenizer_dir)
    docs = [text for path in files for text in read_documents(path)]
    windows = sample_windows(docs, tok.encode_stream, args.nsamples, args.seqlen, args.seed)
    obj = {
        "tokens": torch.from_numpy(windows),
        "seed": args.seed,
        "seqlen": args.seqlen,
        "nsamples": args.nsamples,
        # names, not paths: the file must not depend on where the inputs sit
        "sources": [{"file": os.path.basename(f), "sha256": sha256_file(f)} for f in files],
        "tokenizer": {k: v for k, v in tok.meta("encode_ordinary" if args.tokenizer is None
                                                  else "with the tokenizer's special tokens").items() if k != "loaded_from"},
        "method": METHOD,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = temp_name(os.path.abspath(args.out))
    try:
        with open(tmp, "wb") as f:
            f.write(calibration_bytes(obj))
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{args.out}: {args.nsamples} windows of {args.seqlen} tokens from {len(docs):,} documents "
          f"in {len(files)} file(s), seed {args.seed}")


if __name__ == "__main__":
    cli.run(main)
