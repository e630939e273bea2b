"""Tokenise C4 JSON-lines files into train.bin / val.bin: raw token ids, end-of-text after every document.

    python data/c4_dataset/prepare.py \
        --input ../shared/data/c4/en/c4-train.00000-of-01024.head1000.json.gz \
        --val_files ../shared/data/c4/en/c4-validation.00000-of-00008.head1000.json.gz

Reads allenai/c4 `*.json.gz`, plain `*.jsonl` (optionally gzipped) and RedPajama's C4 `.jsonl` (the extra `meta`
field is ignored): one JSON object with a "text" field per line. The validation split is either whole files
(--val_files) or a seeded document-level split (--val_fraction). The output does not depend on --num_proc. The
tokenizer is tiktoken's GPT-2 `encode_ordinary` with EOT (50256), or with --tokenizer MODEL (a folder, a .gguf file
or a hub id) that model's own (transformers' AutoTokenizer, offline; no special tokens inside a document, its eos
token after each). Ids are uint16 when the vocabulary fits (<= 65,536), else uint32. meta.json records the dtype,
the tokenizer (name, vocabulary size, fingerprint), counts, sources with sha256 and the date; the loader reads the
dtype from it and refuses a model of another tokenizer. With --download N it first fetches the first N allenai/c4
`en` train shards and one validation shard (needs network).
"""
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import time
import urllib.request
from collections import deque
from datetime import datetime, timezone

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cli  # noqa: E402
from cli import UserError, temp_name  # noqa: E402
from data.tokenizer import TOKENIZER_DIR_HELP, get_tokenizer  # noqa: E402
from sources import TOKENIZER_HELP  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl", ".json")
CHUNK_DOCS = 512  # documents per worker task: big enough to amortise pickling, small enough to stream
C4_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main/en/{name}"


# ---------------------------------------------------------------- reading inputs (also used by other scripts)

def expand_inputs(patterns, flag="--input"):
    """Files named by paths, globs or folders (a folder means its *.json.gz / *.jsonl files), in order."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, n) for n in os.listdir(pattern) if n.endswith(DATA_SUFFIXES))
            if not found:
                raise UserError(f"{flag} {pattern}: folder has no {' / '.join(DATA_SUFFIXES)} files")
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not found:
                raise UserError(f"{flag} {pattern}: no file matches")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise UserError(f"{flag} {pattern}: not found")
        files += [f for f in found if f not in files]
    return files


def read_lines(path):
    """Yield (line number, line) of a JSON-lines file, gzipped or not; blank lines are skipped."""
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; EOFError = truncated gzip
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})")
    except UnicodeDecodeError:
        raise UserError(f"{path}:{lineno + 1}: not UTF-8 text")


def parse_text(path, lineno, line):
    """The "text" field of one JSON line; a bad line names its file and line number."""
    try:
        doc = json.loads(line.rstrip("\r\n"))  # so an error column counts within this line
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise UserError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
    return doc["text"]


def read_documents(path):
    """Yield the text of every document in a C4 file; an empty file is an error (usually a wrong path)."""
    n = 0
    for lineno, line in read_lines(path):
        n += 1
        yield parse_text(path, lineno, line)
    if n == 0:
        raise UserError(f"{path}: empty file (no documents)")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- writing outputs (also used by other scripts)

def refuse_existing(paths, force):
    """Never overwrite a previous result by accident."""
    for path in paths:
        if os.path.exists(path) and not force:
            raise UserError(f"{path} already exists: pass --force to overwrite it")


def now_utc():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- tokenising

def goes_to_val(seed, path, lineno, fraction):
    """Seeded document-level split: depends only on (seed, file name, line), not on order or workers."""
    key = f"{seed}/{os.path.basename(path)}/{lineno}".encode()
    u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2.0 ** 64
    return u < fraction


def tokenize_chunk(task):
    """Worker: (path, [(lineno, line)], split rule) -> (tokens, tokens per doc, is-val per doc)."""
    path, lines, assign, seed, fraction, tokenizer = task
    tok = get_tokenizer(*tokenizer)
    docs = [tok.encode_document(parse_text(path, lineno, line)) + [tok.eos_id] for lineno, line in lines]
    if assign == "split":
        is_val = np.array([goes_to_val(seed, path, lineno, fraction) for lineno, _ in lines], dtype=bool)
    else:
        is_val = np.full(len(lines), assign == "val", dtype=bool)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.fromiter((t for d in docs for t in d), dtype=tok.dtype, count=int(lengths.sum()))
    return tokens, lengths, is_val


def chunks(files, assign, seed, fraction, tokenizer):
    """Worker tasks of CHUNK_DOCS raw lines each, file by file, in order."""
    for path in files:
        lines, n = [], 0
        for item in read_lines(path):
            lines.append(item)
            n += 1
            if len(lines) == CHUNK_DOCS:
                yield path, lines, assign, seed, fraction, tokenizer
                lines = []
        if lines:
            yield path, lines, assign, seed, fraction, tokenizer
        if n == 0:
            raise UserError(f"{path}: empty file (no documents)")


def ordered_map(fn, tasks, num_proc):
    """fn over tasks in num_proc processes, results in task order; only a few tasks in flight (bounded memory)."""
    if num_proc == 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.Pool(num_proc) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenize_group(files, assign, outs, stats, args, progress):
    """Stream one input group into the open split files, honouring --max_docs / --max_tokens for the group."""
    docs_left = args.max_docs if args.max_docs is not None else float("inf")
    tokens_left = args.max_tokens if args.max_tokens is not None else float("inf")
    tasks = chunks(files, assign, args.seed, args.val_fraction, (args.tokenizer, args.tokenizer_dir))
    for tokens, lengths, is_val in ordered_map(tokenize_chunk, tasks, args.num_proc):
        # keep whole documents: stop after the document that reaches the token limit
        ends = np.cumsum(lengths)
        keep = int(min(len(lengths), docs_left, np.searchsorted(ends, tokens_left) + 1))
        tokens, lengths, is_val = tokens[:ends[keep - 1]], lengths[:keep], is_val[:keep]
        for split, doc_mask in (("train", ~is_val), ("val", is_val)):
            part = tokens[np.repeat(doc_mask, lengths)]
            outs[split].write(part.tobytes())
            stats[split]["tokens"] += len(part)
            stats[split]["documents"] += int(doc_mask.sum())
        docs_left -= keep
        tokens_left -= int(lengths.sum())
        progress.update(keep)
        if docs_left <= 0 or tokens_left <= 0:
            return


# ---------------------------------------------------------------- download (opt-in, needs network)

def download(url, path):
    """Fetch url to path (skipped when present), through a temp name so a broken download never looks done."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_name(path)
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"download of {url} failed ({e}); without network, pass local files with --input")


def download_c4(n_shards, folder):
    train = [os.path.join(folder, f"c4-train.{i:05d}-of-01024.json.gz") for i in range(n_shards)]
    val = os.path.join(folder, "c4-validation.00000-of-00008.json.gz")
    for path in train + [val]:
        download(C4_URL.format(name=os.path.basename(path)), path)
    return train, [val]


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", action="extend", nargs="+", default=[],
                   help="C4 file, glob or folder (several allowed)")
    p.add_argument("--out_dir", default=HERE, help="where train.bin, val.bin and meta.json go")
    p.add_argument("--val_files", action="extend", nargs="+", default=[],
                   help="file, glob or folder whose documents all go to val.bin (several allowed)")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="else: send this fraction of --input documents to val.bin (default 0.005)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --val_fraction split")
    p.add_argument("--num_proc", type=int, default=max(1, min(8, (os.cpu_count() or 1) // 2)),
                   help="tokenizer processes; the output does not depend on it")
    p.add_argument("--max_docs", type=int, default=None, help="read at most this many documents per input group")
    p.add_argument("--max_tokens", type=int, default=None,
                   help="stop an input group after the document that reaches this many tokens")
    p.add_argument("--tokenizer", default=None, metavar="MODEL", help=TOKENIZER_HELP)
    p.add_argument("--tokenizer_dir", default=None, help="tiktoken gpt2 only: " + TOKENIZER_DIR_HELP)
    p.add_argument("--download", type=int, default=None, metavar="N",
                   help="first fetch N allenai/c4 en train shards + 1 validation shard into OUT_DIR/raw (network)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = p.parse_args(argv)
    if args.download is not None and args.input:
        raise UserError("use either --input or --download, not both")
    if args.download is None and not args.input:
        raise UserError("no input: pass --input C4_FILES (or --download N to fetch C4 shards)")
    if args.download is not None and not 1 <= args.download <= 1024:
        raise UserError(f"--download must be between 1 and 1024 shards, got {args.download}")
    if args.val_files and args.val_fraction is not None:
        raise UserError("use either --val_files or --val_fraction, not both")
    if args.val_fraction is None and not args.val_files and args.download is None:
        args.val_fraction = 0.005
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    for name in ("num_proc", "max_docs", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    paths = {s: os.path.join(args.out_dir, f"{s}.bin") for s in ("train", "val")}
    meta_path = os.path.join(args.out_dir, "meta.json")
    refuse_existing(list(paths.values()) + [meta_path], args.force)

    if args.download is not None:
        train_files, val_files = download_c4(args.download, os.path.join(args.out_dir, "raw"))
        if args.val_fraction is not None:
            train_files, val_files = train_files + val_files, []
    else:
        train_files = expand_inputs(args.input, "--input")
        val_files = expand_inputs(args.val_files, "--val_files")
    both = [f for f in train_files if os.path.realpath(f) in {os.path.realpath(v) for v in val_files}]
    if both:
        raise UserError(f"{both[0]} is in both --input and --val_files")
    tok = get_tokenizer(args.tokenizer, args.tokenizer_dir)  # fail on a missing tokenizer before any work

    groups = [(train_files, "split" if args.val_fraction is not None else "train")]
    if val_files:
        groups.append((val_files, "val"))
    stats = {s: {"tokens": 0, "documents": 0} for s in paths}
    os.makedirs(args.out_dir, exist_ok=True)
    tmp = {s: temp_name(p) for s, p in paths.items()}
    t0 = time.time()
    outs = {}
    try:
        for split in paths:
            outs[split] = open(tmp[split], "wb")
        with tqdm(unit="doc", desc="tokenizing", disable=None) as progress:
            for files, assign in groups:
                tokenize_group(files, assign, outs, stats, args, progress)
        for f in outs.values():
            f.close()
        for split in paths:
            if stats[split]["documents"] == 0:
                hint = "raise --val_fraction or pass --val_files" if split == "val" else "check --input"
                raise UserError(f"the {split} split is empty: {hint}")
        if os.path.exists(meta_path):
            os.remove(meta_path)  # meta.json last: its presence means both .bin files are complete
        for split, path in paths.items():
            os.replace(tmp[split], path)
    finally:
        for split in paths:
            if split in outs:
                outs[split].close()  # closing twice is harmless
            if os.path.exists(tmp[split]):
                os.remove(tmp[split])
    seconds = time.time() - t0

    meta = {
        "dataset": "c4",
        "format": f"raw {tok.dtype} little-endian token ids, end-of-text ({tok.eos_id}) after every document",
        "dtype": tok.dtype,
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eos_id,
        "tokenizer": tok.meta("encode_ordinary" if args.tokenizer is None else "no special tokens, eos after each"),
        "splits": {s: {"file": os.path.basename(paths[s]), **stats[s]} for s in paths},
        "val_split": ({"fraction": args.val_fraction, "seed": args.seed} if args.val_fraction is not None
                      else "whole files (--val_files)"),
        "limits": {"max_docs": args.max_docs, "max_tokens": args.max_tokens},
        "sources": {"train": [{"file": f, "sha256": sha256_file(f)} for f in train_files],
                    "val": [{"file": f, "sha256": sha256_file(f)} for f in val_files]},
        "created": now_utc(),
    }
    cli.write_json(meta_path, meta)
    total = stats["train"]["tokens"] + stats["val"]["tokens"]
    for s in paths:
        print(f"{paths[s]}: {stats[s]['tokens']:,} tokens, {stats[s]['documents']:,} documents")
    print(f"tokenized {total:,} tokens in {seconds:.2f} s ({total / max(seconds, 1e-9):,.0f} tokens/s, "
          f"num_proc {args.num_proc})")
    return meta


if __name__ == "__main__":
    cli.run(main)
