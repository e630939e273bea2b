"""Tokenise the WikiText-2 (raw) test and validation splits into test.bin / val.bin for perplexity evaluation.

    python data/wikitext/prepare.py --input ../shared/data/wikitext2

The paper's protocol: the split's Hugging Face rows joined with "\\n\\n", tokenised with GPT-2 `encode_ordinary`
(no EOT); the test split gives 287,644 tokens. With --tokenizer MODEL (a folder, a .gguf file or a hub id), Wanda's
and SparseGPT's protocol for other models: that model's tokenizer on the same joined text, with the special tokens
the tokenizer itself adds (OPT and LLaMA: one BOS at the very start of the stream, so only the first window begins
with it); uint32 ids when the vocabulary exceeds 65,536. Reads `wiki.test.raw` / `wiki.valid.raw`, `test.jsonl` /
`validation.jsonl` (one {"text": ...} row per line) or Hugging Face parquet files (needs pyarrow or pandas). With
--download it fetches the wikitext-2-raw-v1 parquet files first (needs network).
"""
import glob
import importlib.util
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

import cli  # noqa: E402
from cli import UserError  # noqa: E402
from data.c4_dataset.prepare import download, now_utc, refuse_existing, sha256_file, temp_name  # noqa: E402
from data.tokenizer import TOKENIZER_DIR_HELP, get_tokenizer  # noqa: E402
from sources import TOKENIZER_HELP  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Per output split, the file names to look for in an --input folder, in order of preference.
CANDIDATES = {"test": ["test.jsonl", "wiki.test.raw", "test-*.parquet", "wikitext-2-raw-v1/test-*.parquet"],
              "val": ["validation.jsonl", "wiki.valid.raw", "validation-*.parquet",
                      "wikitext-2-raw-v1/validation-*.parquet"]}
HF_URL = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/wikitext-2-raw-v1/{name}"
HF_FILES = {"test": "test-00000-of-00001.parquet", "val": "validation-00000-of-00001.parquet"}


def split_of(path):
    """Which split a file holds, from its name (wiki.test.raw, validation.jsonl, test-00000-of-00001.parquet)."""
    name = os.path.basename(path).lower()
    if "test" in name:
        return "test"
    if "valid" in name:
        return "val"
    raise UserError(f"{path}: cannot tell the split from the name; name it like wiki.test.raw, "
                    "test.jsonl or test-00000-of-00001.parquet (validation likewise)")


def find_split_files(inputs):
    """{split: [files]} from files and folders given as --input."""
    found = {}
    for path in inputs:
        if os.path.isdir(path):
            for split, patterns in CANDIDATES.items():
                for pattern in patterns:
                    files = sorted(glob.glob(os.path.join(path, pattern)))
                    if files:
                        found.setdefault(split, files)
                        break
        elif os.path.isfile(path):
            found.setdefault(split_of(path), [path])
        else:
            raise UserError(f"--input {path}: not found")
    if "test" not in found:
        raise UserError(f"no WikiText-2 test split in {', '.join(inputs)}: expected wiki.test.raw, test.jsonl "
                        "or test-*.parquet (run with --download if you have network)")
    return found


def read_raw_rows(path):
    """Rows as the Hugging Face loader made them: one per line, newline kept, blank lines become ""."""
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def read_jsonl_rows(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
            rows.append(row["text"])
    return rows


def read_parquet_rows(path):
    try:
        import pyarrow.parquet as pq
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); "
                        "or use wiki.test.raw / test.jsonl instead")
    return pd.read_parquet(path, columns=["text"])["text"].tolist()


def read_rows(path):
    try:
        if path.endswith(".parquet"):
            return read_parquet_rows(path)
        if path.endswith((".jsonl", ".json")):
            return read_jsonl_rows(path)
        return read_raw_rows(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", action="extend", nargs="+", default=None,
                   help="WikiText-2 folder or split files (default: the shared data folder's wikitext2)")
    p.add_argument("--out_dir", default=HERE, help="where test.bin, val.bin and meta.json go")
    p.add_argument("--tokenizer", default=None, metavar="MODEL", help=TOKENIZER_HELP)
    p.add_argument("--tokenizer_dir", default=None, help="tiktoken gpt2 only: " + TOKENIZER_DIR_HELP)
    p.add_argument("--download", action="store_true",
                   help="fetch the wikitext-2-raw-v1 parquet files into OUT_DIR/raw first (network, pyarrow)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = p.parse_args(argv)
    if args.download and args.input:
        raise UserError("use either --input or --download, not both")
    return args


def main(argv=None):
    args = parse_args(argv)
    paths = {s: os.path.join(args.out_dir, f"{s}.bin") for s in ("test", "val")}
    meta_path = os.path.join(args.out_dir, "meta.json")
    refuse_existing(list(paths.values()) + [meta_path], args.force)
    if args.download:
        if not any(importlib.util.find_spec(m) for m in ("pyarrow", "pandas")):
            raise UserError("--download fetches parquet files, which need pyarrow: pip install pyarrow")
        raw = os.path.join(args.out_dir, "raw")
        for name in HF_FILES.values():
            download(HF_URL.format(name=name), os.path.join(raw, name))
        inputs = [raw]
    else:
        inputs = args.input or [os.path.join(cli.default_data_root(), "wikitext2")]
    sources = find_split_files(inputs)
    tok = get_tokenizer(args.tokenizer, args.tokenizer_dir)

    splits = {}
    for split, files in sources.items():
        rows = [row for path in files for row in read_rows(path)]
        if not any(rows):
            raise UserError(f"{', '.join(files)}: no text (empty file?)")
        tokens = np.array(tok.encode_stream("\n\n".join(rows)), dtype=tok.dtype)
        splits[split] = {"tokens": tokens, "rows": len(rows), "files": files}

    os.makedirs(args.out_dir, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # meta.json last: its presence means the .bin files are complete
    for split, info in splits.items():
        tmp = temp_name(paths[split])
        try:
            info["tokens"].tofile(tmp)
            os.replace(tmp, paths[split])
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"{paths[split]}: {len(info['tokens']):,} tokens from {info['rows']:,} rows")
    if "val" not in splits:
        if os.path.exists(paths["val"]):
            os.remove(paths["val"])  # --force was given; a val.bin from other inputs would be stale
        print("note: no validation split found, wrote only test.bin")

    cli.write_json(meta_path, {
        "dataset": "wikitext-2-raw-v1",
        "format": f"raw {tok.dtype} little-endian token ids of the split's rows joined with \"\\n\\n\"",
        "dtype": tok.dtype,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.meta("encode_ordinary (no EOT)" if args.tokenizer is None
                              else "the tokenizer's own special tokens (BOS at the start, if it adds one)"),
        "splits": {s: {"file": os.path.basename(paths[s]), "tokens": len(info["tokens"]), "rows": info["rows"],
                       "sources": [{"file": f, "sha256": sha256_file(f)} for f in info["files"]]}
                   for s, info in splits.items()},
        "created": now_utc(),
    })


if __name__ == "__main__":
    cli.run(main)
