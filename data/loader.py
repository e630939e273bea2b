"""Batches from the prepared token files: training windows, fixed eval windows, WikiText-2 tokens, calibration.

Training data is seeded per optimizer step, not per rank: the whole global batch of window offsets for step
`s` comes from one stream seeded with (seed, s), and rank r takes its slice. A run therefore sees the same
data whatever its number of ranks or micro-batch split, and resuming needs only the step number.
"""
import json
import os

import numpy as np
import torch

from cli import UserError

TRAIN_STREAM, EVAL_STREAM = 0, 1  # keeps the eval windows independent of every training step
CALIBRATION_KEYS = ("tokens", "seed", "seqlen", "nsamples", "sources", "tokenizer")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def read_meta(folder):
    """meta.json of a prepared data folder (None when there is none: files from before meta.json are uint16)."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): rerun the prepare script with --force") from None
    if meta.get("dtype", "uint16") not in TOKEN_DTYPES:
        raise UserError(f"{path}: unknown token dtype {meta.get('dtype')!r} (expected uint16 or uint32)")
    return meta


def token_dtype(meta):
    return TOKEN_DTYPES[(meta or {}).get("dtype", "uint16")]


def check_tokenizer(meta, model, where):
    """Stop when the token files in `where` were made with another tokenizer than the model's: training or
    evaluating on ids of another vocabulary would silently be garbage."""
    from data.tokenizer import gpt2_fingerprint

    if not meta:
        return
    tok = meta.get("tokenizer") or {}
    if isinstance(tok, str):  # calibration files from before fingerprints: "tiktoken gpt2, encode_ordinary"
        tok = {"name": "tiktoken gpt2" if tok.startswith("tiktoken gpt2") else tok}
    vocab = tok.get("vocab_size") or meta.get("vocab_size")
    name = tok.get("name", "?")
    model_tok = getattr(model, "tokenizer_info", None) or {}
    if vocab and vocab > model.config.vocab_size:
        raise UserError(f"{where} holds tokens of {name} ({vocab:,} ids) but the model has a vocabulary of "
                        f"{model.config.vocab_size:,}: prepare the data with the model's tokenizer "
                        f"(--tokenizer {model_tok.get('dir') or 'MODEL_DIR'})")
    data_fp = tok.get("fingerprint") or (gpt2_fingerprint() if name == "tiktoken gpt2" else None)
    model_fp = model_tok.get("fingerprint")
    if data_fp and model_fp and data_fp != model_fp:
        which = model_tok.get("dir") or "GPT-2's BPE"
        raise UserError(f"{where} was tokenised with {name}, not with the model's tokenizer ({which}): prepare it "
                        f"with `--tokenizer {model_tok.get('dir') or 'MODEL_DIR'}` (or pick the matching model)")


def _rng(seed, stream, index):
    # Three entropy words, always: distinct (stream, index) pairs can never share a seed sequence.
    return np.random.default_rng([seed, stream, index])


def _open_tokens(path, dtype=np.uint16):
    # A fresh memmap per batch: nanoGPT found that keeping one open makes the process's memory grow.
    return np.memmap(path, dtype=dtype, mode="r")


def get_batch(path, offsets, block_size, device="cpu", dtype=np.uint16, vocab_size=None):
    """(x, y) int64 tensors of shape (len(offsets), block_size); y is x shifted by one token.

    vocab_size: ids at or above it stop with one line (a token file made for a larger vocabulary)."""
    windows = _open_tokens(path, dtype)[np.asarray(offsets)[:, None] + np.arange(block_size + 1)]
    if vocab_size is not None and windows.size and int(windows.max()) >= vocab_size:
        raise UserError(f"{path} holds token id {int(windows.max()):,}, outside the model's vocabulary of "
                        f"{vocab_size:,}: prepare the data with the model's tokenizer (--tokenizer MODEL_DIR)")
    windows = torch.from_numpy(windows.astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if torch.device(device).type == "cuda":
        # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class BinDataset:
    """A prepared token file (train.bin, val.bin), uint16 or uint32 as its folder's meta.json says, checked to
    hold at least one window. check_model(model) ties it to a model: same tokenizer, ids within its vocabulary.
    tokenizer_flag: the prepare script's --tokenizer for the model (data.tokenizer.prepare_flag), for the hint."""

    def __init__(self, path, block_size, tokenizer_flag=""):
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: run `python data/c4_dataset/prepare.py --input C4_FILES "
                            f"--out_dir {os.path.dirname(path) or '.'}{tokenizer_flag}` first")
        self.meta = read_meta(os.path.dirname(path) or ".")
        self.dtype = token_dtype(self.meta)
        size, width = os.path.getsize(path), np.dtype(self.dtype).itemsize
        if size % width:
            raise UserError(f"{path} is not a whole number of {np.dtype(self.dtype).name} tokens: not a token "
                            "file made by prepare.py (or its meta.json belongs to other files)")
        self.path, self.block_size, self.num_tokens = path, block_size, size // width
        self.vocab_size = None
        if self.num_tokens < block_size + 1:
            raise UserError(f"{path} holds {self.num_tokens:,} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}: prepare more data or lower block_size")

    def __len__(self):
        return self.num_tokens

    def check_model(self, model):
        check_tokenizer(self.meta, model, self.path)
        self.vocab_size = model.config.vocab_size
        return self

    def get_batch(self, offsets, device="cpu"):
        return get_batch(self.path, offsets, self.block_size, device, self.dtype, self.vocab_size)


class GlobalBatchSampler:
    """Window offsets of each optimizer step's global batch, a pure function of (seed, step)."""

    def __init__(self, data_len, block_size, global_batch_size, seed):
        if data_len < block_size + 1:
            raise UserError(f"{data_len} tokens cannot hold one window of block_size + 1 = {block_size + 1}")
        if global_batch_size < 1 or seed < 0:
            raise UserError(f"need global_batch_size >= 1 and seed >= 0, got {global_batch_size} and {seed}")
        self.data_len, self.block_size = data_len, block_size
        self.global_batch_size, self.seed = global_batch_size, seed

    def offsets(self, step):
        """global_batch_size start offsets; every window of block_size + 1 tokens fits in the data."""
        return _rng(self.seed, TRAIN_STREAM, step).integers(0, self.data_len - self.block_size,
                                                            size=self.global_batch_size)

    def rank_offsets(self, step, rank, world_size):
        """This rank's contiguous slice of the step's global batch."""
        if self.global_batch_size % world_size:
            raise UserError(f"global batch {self.global_batch_size} is not divisible by world size {world_size}")
        per_rank = self.global_batch_size // world_size
        return self.offsets(step)[rank * per_rank:(rank + 1) * per_rank]


def micro_batches(dataset, sampler, step, rank, world_size, micro_batch_size, device="cpu"):
    """Yield this rank's (x, y) micro-batches of `step`, in order (gradient accumulation = their count)."""
    offsets = sampler.rank_offsets(step, rank, world_size)
    if len(offsets) % micro_batch_size:
        raise UserError(f"per-rank batch {len(offsets)} (global {sampler.global_batch_size} / world size "
                        f"{world_size}) is not divisible by micro batch {micro_batch_size}")
    for i in range(0, len(offsets), micro_batch_size):
        yield dataset.get_batch(offsets[i:i + micro_batch_size], device)


def eval_offsets(data_len, block_size, batch_size, eval_iters, seed=0):
    """(eval_iters, batch_size) fixed offsets: every evaluation of a run sees the same validation windows."""
    if data_len < block_size + 1:
        raise UserError(f"{data_len} tokens cannot hold one window of block_size + 1 = {block_size + 1}")
    return _rng(seed, EVAL_STREAM, 0).integers(0, data_len - block_size, size=(eval_iters, batch_size))


def eval_batches(dataset, batch_size, eval_iters, seed=0, device="cpu"):
    """Yield the eval_iters fixed (x, y) validation batches."""
    for offsets in eval_offsets(len(dataset), dataset.block_size, batch_size, eval_iters, seed):
        yield dataset.get_batch(offsets, device)


def load_wikitext_tokens(wikitext_dir, split="test", tokenizer_flag=""):
    """The WikiText-2 split made by data/wikitext/prepare.py, as a 1-D int64 tensor (test: 287,644 tokens).

    Perplexity evaluation cuts it into non-overlapping windows and drops the tail. tokenizer_flag: as BinDataset's.
    """
    if split not in ("test", "val"):
        raise UserError(f"WikiText split must be 'test' or 'val', got {split!r}")
    path = os.path.join(wikitext_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `python data/wikitext/prepare.py --out_dir {wikitext_dir}"
                        f"{tokenizer_flag}` first")
    meta = read_meta(wikitext_dir)
    tokens = np.fromfile(path, dtype=token_dtype(meta))
    if meta is not None:
        # a stale or half-written file would silently change the perplexity
        expected = meta.get("splits", {}).get(split, {}).get("tokens")
        if expected is not None and expected != len(tokens):
            raise UserError(f"{path} holds {len(tokens):,} tokens but meta.json says {expected:,}: "
                            "rerun data/wikitext/prepare.py with --force")
    return torch.from_numpy(tokens.astype(np.int64))


def check_wikitext(wikitext_dir, tokens, model):
    """load_wikitext_tokens' tokens are the model's: same tokenizer, every id within its vocabulary."""
    where = os.path.join(wikitext_dir, "test.bin")
    check_tokenizer(read_meta(wikitext_dir), model, where)
    if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
        raise UserError(f"{where} holds token id {int(tokens.max()):,}, outside the model's vocabulary of "
                        f"{model.config.vocab_size:,}: prepare it with the model's tokenizer "
                        "(data/wikitext/prepare.py --tokenizer MODEL_DIR)")


def load_calibration(path, tokenizer_flag=""):
    """(tokens LongTensor (nsamples, seqlen), metadata dict) from a file made by prepare_calibration_data.py.
    tokenizer_flag: as BinDataset's."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `python prepare_calibration_data.py --input C4_FILES "
                        f"--out {path}{tokenizer_flag}` first")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a zip, not a torch file, foreign pickle: all the same to the user
        raise UserError(f"{path} is not a calibration file made by prepare_calibration_data.py "
                        f"({type(e).__name__})")
    if not isinstance(obj, dict) or any(k not in obj for k in CALIBRATION_KEYS):
        raise UserError(f"{path} is not a calibration file made by prepare_calibration_data.py "
                        f"(expected keys {', '.join(CALIBRATION_KEYS)})")
    tokens = obj["tokens"]
    if (not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long
            or tuple(tokens.shape) != (obj["nsamples"], obj["seqlen"])):
        raise UserError(f"{path}: 'tokens' is not a LongTensor of shape (nsamples, seqlen)")
    return tokens, {k: v for k, v in obj.items() if k != "tokens"}
