"""Checkpoints, and the one loader: a model of any family (dense or sparse, masks and SLoRB included) from a
checkpoint, an export folder or a Hugging Face folder.

A checkpoint is one torch file holding the model state (masks and SLoRB included), what is needed to rebuild
the model (its family and full config, the sparse layer names and their sparsify() arguments, its tokenizer),
and for training checkpoints the optimizer, iteration, RNG states of every rank, the run's config and the git
commit. Checkpoints written before model families existed (no "family" key) are GPT-2.

Every file is written under a temporary name, fsynced and renamed, and gets a `NAME.sha256` beside it
(`sha256sum -c` format) that load_checkpoint() verifies: a truncated or bit-flipped file is an error, never a
silently different model. main.py keeps the last K training checkpoints as out_dir/ckpt-ITER.pt; ckpt.pt is
the newest (a hard link to it, so it costs no space). nanoGPT's ckpt.pt files are recognised and converted.

Under --parallel fsdp a checkpoint is a folder instead (torch.distributed.checkpoint): every rank writes its own
shards of the weights, masks and optimizer state, and extra.pt holds everything else. It is written under
NAME.tmp and swapped in only when complete; load_model() reads it in a single process, unsharded, so
export.py and evaluate.py take the folder directly.
"""
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import torch

import families
from cli import REPO_ROOT, UserError, is_rank_zero, write_text
from data.tokenizer import gpt2_fingerprint, has_hf_tokenizer, tokenizer_fingerprint
from model import GPT, GPTConfig
from sources import resolve
from sparsity import layer_args, nm_mask, sparse_layers, sparsify

EXPORT_INFO = "sparse_export.json"  # written by export.py beside the weights of a sparse export folder
SLORB_FILE = "slorb.safetensors"
SHARDED_EXTRA = "extra.pt"  # beside the shards of a sharded (FSDP) checkpoint folder


def model_state(model, weights=True) -> dict:
    """What rebuilds the model: its family, config, weights, sparse layers with their arguments, tokenizer.

    weights=False leaves the weights out ("model": None): a sharded checkpoint stores them beside.
    """
    layers = sparse_layers(model)
    sd = model.state_dict() if weights else None
    if weights and model.family == "gpt2":
        sd.pop("lm_head.weight", None)  # tied to wte
    return {
        "family": model.family,
        "model": sd,
        "model_args": families.model_args(model),
        "block_size": model.config.block_size,
        "sparse_layers": [name for name, _ in layers],
        "sparsity_args": layer_args(layers[0][1]) if layers else None,
        "tokenizer": tokenizer_info(model),
    }


def build_model(state: dict, block_size=None):
    """Inverse of model_state(): a model with the same family, sparse layers, masks and weights."""
    family = state.get("family", "gpt2")
    model = families.from_config(family, state["model_args"])
    if state.get("sparse_layers"):
        names = set(state["sparse_layers"])
        # checkpoints from before the tie rule was a setting broke ties towards the lower index
        sparsify(model, filter_fn=lambda name, mod: name in names, init_masks=False,
                 **{"ties": "low", **state["sparsity_args"]})
    if state["model"] is not None:  # None: the weights come from elsewhere (a sharded checkpoint)
        sd = dict(state["model"])
        if family == "gpt2":
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(f"the checkpoint's weights do not match its recorded model "
                            f"({str(e).splitlines()[0]})") from None
    model.config.block_size = state.get("block_size", model.config.block_size)
    model.tokenizer_info = state.get("tokenizer") or _default_tokenizer(family, None)
    return families.crop_context(model, block_size, "the checkpoint") if block_size else model


def tokenizer_info(model) -> dict:
    """{"dir": folder holding the model's tokenizer or None, "fingerprint": see data.tokenizer, or None}."""
    return getattr(model, "tokenizer_info", None) or _default_tokenizer(model.family, None)


def _default_tokenizer(family, source):
    """tokenizer_info of a model loaded from a sources.Source (None: from a checkpoint that records none).

    "dir" is where the tokenizer is: a folder, a .gguf file (its tokenizer is stored inside) or a hub id."""
    if source is not None and (source.gguf_file or has_hf_tokenizer(source.path)):
        return {"dir": source.name, "fingerprint": tokenizer_fingerprint(source.name)}
    # a GPT-2 folder without tokenizer files means GPT-2's own BPE; other families' cannot be guessed
    return {"dir": None, "fingerprint": gpt2_fingerprint() if family == "gpt2" else None}


def load_model(path: str, block_size=None, dtype=torch.float32, what="--model"):
    """The one loader: a model from a checkpoint file (.pt), an export folder (export.py / prune.py: masks and
    a separately kept SLoRB branch restored), a Hugging Face folder of any decoder-only model (or a GPT-2 name),
    a .gguf file or a Hugging Face hub id (sources.resolve).

    what names the flag the path came from, for the error when it is none of these.
    """
    source = resolve(path, what)
    path = source.path
    if source.gguf_file:
        model = families.from_pretrained(path, block_size=block_size, dtype=dtype)
        model.tokenizer_info = _default_tokenizer(model.family, source)
    elif os.path.isfile(path):
        model = build_model(load_checkpoint(path), block_size=block_size).to(dtype)
    elif folder := sharded_checkpoint(path):
        model = load_sharded_model(folder, block_size=block_size).to(dtype)
    elif os.path.isdir(path):
        model = families.from_pretrained(path, block_size=block_size, dtype=dtype)
        model.tokenizer_info = _default_tokenizer(model.family, source)
        if os.path.isfile(os.path.join(path, EXPORT_INFO)):
            restore_export(model, path)
    else:
        raise UserError(f"{what} {path} not found: pass a checkpoint (.pt), an export folder, a Hugging Face "
                        f"model folder (any decoder-only transformers model), a .gguf file or a hub id")
    return model


@torch.no_grad()
def restore_export(model, folder):
    """Give a model loaded from an export folder its SparseLinear layers back, in place.

    Masks are rebuilt from the zeros of the weights (for N:M: the n largest |W| of each group, which keeps every
    non-zero), so W ⊙ M equals the stored weight exactly; a separately kept SLoRB branch is read back from
    slorb.safetensors, which a plain transformers load would silently drop.
    """
    with open(os.path.join(folder, EXPORT_INFO)) as f:
        info = json.load(f)
    names = {families.our_name(model, n) for n in info.get("sparse_layers") or []}
    if not names:
        return model
    args = info["sparsity_args"]
    sparsify(model, filter_fn=lambda name, mod: name in names, init_masks=False, **args)
    slorb = None
    if args.get("slorb_k"):
        path = os.path.join(folder, SLORB_FILE)
        if not os.path.isfile(path):
            raise UserError(f"{folder} was exported with a separate SLoRB branch but {SLORB_FILE} is missing")
        from safetensors.torch import load_file
        slorb = load_file(path)
    for name, layer in sparse_layers(model):
        w = layer.weight.abs()
        mask = nm_mask(w, layer.n, layer.m) if layer.mask_type == "structured" else w != 0
        layer.mask.copy_(mask)
        layer.init_mask.copy_(mask)
        if slorb is not None:
            key = families.hf_name(model, name)
            layer.slorb_S.copy_(slorb[f"{key}.slorb_S"])
            if layer.slorb_X is not None:
                layer.slorb_X.copy_(slorb[f"{key}.slorb_X"])
    return model


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ files on disk
SUMS = ".sha256"
HISTORY = re.compile(r"^ckpt-(\d+)\.pt$")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _accepted_digests(path: str) -> list:
    """The digests NAME.sha256 accepts for NAME ([] if there is none: a file from elsewhere, not verifiable)."""
    try:
        with open(path + SUMS) as f:
            return [line.split()[0] for line in f if line.strip()]
    except (OSError, IndexError):
        return []


def _write_digests(path: str, digests):
    write_text(path + SUMS, "".join(f"{d}  {os.path.basename(path)}\n" for d in digests))


def _fsync_dir(path: str):
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _install(tmp: str, path: str, digest: str):
    """Rename a complete, fsynced tmp file over path. While the rename happens the sidecar accepts both the old
    and the new digest, so a crash at any point leaves path verifiable (old or new, never half of each)."""
    _write_digests(path, list(dict.fromkeys(_accepted_digests(path) + [digest])))
    os.replace(tmp, path)
    _fsync_dir(path)
    _write_digests(path, [digest])


def _write_failed(path: str, e: Exception):
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
    return UserError(f"could not write {path} ({reason}); {path} was left as it was: free disk space or choose "
                     f"another folder, then run again")


# ------------------------------------------------------------------------------------------------ masks on disk
# A bool tensor takes a byte per element in torch.save: for 2:4 masks that is a quarter of fp32 weights' size,
# twice over (mask and init_mask). On disk each mask is stored as bits, and an init_mask equal to its mask (every
# one-shot output, a run before its first mask change) as a reference: 1 bit per masked weight, 2 at most.
def pack_masks(sd: dict) -> dict:
    """A state dict whose bool tensors are {"bits": uint8, "shape": ...} (or {"same_as": key}): see above."""
    out = {}
    for key, value in sd.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            twin = key[:-len("init_mask")] + "mask" if key.endswith(".init_mask") else None
            if twin is not None and twin in sd and torch.equal(value, sd[twin]):
                value = {"same_as": twin}
            else:
                bits = np.packbits(value.detach().cpu().numpy().reshape(-1))
                value = {"bits": torch.from_numpy(bits), "shape": list(value.shape)}
        out[key] = value
    return out


def unpack_masks(sd: dict) -> dict:
    """Inverse of pack_masks(); a state dict with plain bool tensors passes through."""
    out = {}
    for key, value in sd.items():
        if isinstance(value, dict) and "bits" in value:
            n = math.prod(value["shape"])
            value = torch.from_numpy(np.unpackbits(value["bits"].numpy(), count=n).astype(bool)).reshape(
                value["shape"])
        out[key] = value
    return {key: out[value["same_as"]].clone() if isinstance(value, dict) else value for key, value in out.items()}


def save_checkpoint(obj: dict, path: str) -> str:
    """Write to a temporary name, fsync, then rename: a crash or a full disk mid-write never touches the
    previous file. Writes path.sha256 beside it; returns the digest. Masks are stored as bits (pack_masks)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if isinstance(obj.get("model"), dict):
        obj = {**obj, "model": pack_masks(obj["model"])}
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        _install(tmp, path, digest)
        return digest
    except (OSError, RuntimeError) as e:  # ENOSPC, EDQUOT, EIO...; torch reports a failed write as RuntimeError
        if os.path.exists(tmp):  # (write_text leaves no temporary file of the .sha256)
            os.remove(tmp)
        raise _write_failed(path, e) from None


def checkpoint_history(out_dir: str) -> list:
    """[(iter, path)] of out_dir's ckpt-ITER.pt files, oldest first."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, n)) for n in names if (m := HISTORY.match(n))]
    return sorted(found)


def save_training_checkpoint(obj: dict, out_dir: str, keep: int) -> str:
    """out_dir/ckpt-ITER.pt, ckpt.pt (the newest, hard-linked), and only the last `keep` ckpt-*.pt kept.

    History files of later iterations than this one belong to a timeline abandoned by a resume from an older
    checkpoint (their newer ones were damaged): they are removed too."""
    it = obj["iter_num"]
    path = os.path.join(out_dir, f"ckpt-{it}.pt")
    digest = save_checkpoint(obj, path)
    latest = os.path.join(out_dir, "ckpt.pt")
    tmp = latest + ".tmp"
    try:
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system: a copy
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        _install(tmp, latest, digest)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise _write_failed(latest, e) from None
    history = checkpoint_history(out_dir)
    older = [p for i, p in history if i < it]
    for p in [p for i, p in history if i > it] + older[:max(len(older) - (keep - 1), 0)]:
        for f in (p, p + SUMS):
            if os.path.exists(f):
                os.remove(f)
    return path


def damage(path: str):
    """Why path cannot be trusted ('fails its sha256 check ...'), or None if it verifies or has no sidecar."""
    accepted = _accepted_digests(path)
    if accepted and file_sha256(path) not in accepted:
        return "fails its sha256 check (damaged or truncated on disk)"
    return None


def _read(path: str):
    problem = damage(path)
    if problem:
        raise UserError(f"{path} {problem}")
    try:
        # weights_only=False: our own checkpoints carry Python and NumPy RNG states (trusted files only).
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt["model"] = unpack_masks(ckpt["model"])
    return ckpt


def _iteration(path, ckpt=None):
    m = HISTORY.match(os.path.basename(path))
    return int(m.group(1)) if m else (ckpt or {}).get("iter_num")


def newest_intact(out_dir: str, exclude=()):
    """(path, ckpt, skipped) of out_dir's newest checkpoint that verifies and loads; skipped lists
    (path, problem) of the newer ones that did not. path is None when there is none."""
    candidates = [p for _, p in reversed(checkpoint_history(out_dir))]
    latest = os.path.join(out_dir, "ckpt.pt")
    if os.path.isfile(latest):
        candidates.append(latest)  # the newest history file's alias; alone in runs without history
    skipped = []
    for path in candidates:
        if path in exclude:
            continue
        try:
            return path, load_checkpoint(path, _hint=False), skipped
        except UserError as e:
            skipped.append((path, str(e).removeprefix(path).strip()))
    return None, None, skipped


def load_checkpoint(path: str, _hint=True) -> dict:
    """A checkpoint of this project (verified against its .sha256), or a nanoGPT ckpt.pt converted to one."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = _read(path)
    except UserError as e:
        if not _hint:
            raise
        good, ckpt, _ = newest_intact(os.path.dirname(os.path.abspath(path)), exclude=(os.path.abspath(path),))
        if good is None:
            raise
        raise UserError(f"{e}; the newest intact checkpoint beside it is {good} (iter {_iteration(good, ckpt)})") \
            from None
    if isinstance(ckpt, dict) and "model_args" in ckpt and "model" in ckpt and "sparse_layers" not in ckpt:
        return from_nanogpt(ckpt, path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project (main.py or prune.py) or by nanoGPT")
    return ckpt


# ------------------------------------------------------------------------------------------------ sharded (FSDP)
def sharded_checkpoint(path):
    """The complete sharded checkpoint folder at path (or the previous one, path.old, when a swap was cut short),
    or None."""
    for folder in (path, path + ".old"):
        if os.path.isfile(os.path.join(folder, ".metadata")) and os.path.isfile(os.path.join(folder, SHARDED_EXTRA)):
            return folder
    return None


def _sharded_state(model, optimizer=None):
    """What a rank writes and reads: parameters as FSDP's DTensor shards, masks as DTensors sharded like their
    weights (each rank holds its rows, parallelize.shard_masks), the optimizer state by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor, Shard

    sd = model.state_dict()
    for name, layer in sparse_layers(model):
        for buffer in ("mask", "init_mask"):
            sd[f"{name}.{buffer}"] = DTensor.from_local(getattr(layer, buffer), model.fsdp_mesh, [Shard(0)],
                                                        run_check=False, shape=layer.weight.shape,
                                                        stride=layer.weight.stride())
    state = {"model": sd}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(path, model, optimizer, extra: dict, rank: int):
    """Every rank writes its shards to path.tmp, rank 0 adds extra.pt, then path.tmp replaces path (the old
    folder kept as path.old until the new one is in place): a half-written checkpoint is never the one read."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp)
    if rank == 0:
        save_checkpoint(extra, os.path.join(tmp, SHARDED_EXTRA))
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded_into(path, model, optimizer=None) -> dict:
    """Resume: read this rank's shards into the sharded model (and optimizer) in place; returns extra.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)  # in place: parameters, masks (their DTensor views) and optimizer state
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return load_checkpoint(os.path.join(path, SHARDED_EXTRA))


def load_sharded_model(path, block_size=None):
    """A sharded checkpoint as one ordinary (unsharded) model, in a single process: for export and evaluation."""
    import torch.distributed.checkpoint as dcp

    extra = load_checkpoint(os.path.join(path, SHARDED_EXTRA))
    model = build_model({**extra, "model": None})
    sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=path)
    model.load_state_dict(sd)
    return families.crop_context(model, block_size, path) if block_size else model


# ------------------------------------------------------------------------------------------------ nanoGPT
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def from_nanogpt(ckpt: dict, path: str) -> dict:
    """nanoGPT's {'model', 'model_args', 'iter_num', 'config', ...} -> this project's model-only checkpoint.

    nanoGPT's GPT has the same module names as model.GPT; torch.compile's `_orig_mod.` prefix, the causal-mask
    buffers (`attn.bias`, PyTorch < 2) and the tied lm_head are dropped. One real difference remains: nanoGPT's
    MLP uses the exact GELU, this GPT-2 (like Hugging Face's) the tanh approximation, at most 4.7e-4 apart per
    activation, so outputs differ slightly from nanoGPT's own."""
    args = dict(ckpt["model_args"])
    unknown = sorted(set(args) - set(NANOGPT_ARGS))
    missing = sorted({"n_layer", "n_head", "n_embd", "block_size", "vocab_size"} - set(args))
    if unknown or missing:
        raise UserError(f"{path} looks like a nanoGPT checkpoint but its model_args "
                        f"{'has ' + ', '.join(unknown) if unknown else 'lacks ' + ', '.join(missing)}, which this "
                        f"GPT-2 cannot map: export it to a Hugging Face GPT-2 folder and use that")
    config = GPTConfig(**args)
    sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(".attn.bias")}  # causal masks, not weights
    head = sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != expected or (head is not None and not torch.equal(head, sd["transformer.wte.weight"])):
        diff = sorted(set(got) ^ set(expected)) or [k for k in got if got[k] != expected[k]] or ["lm_head.weight"]
        raise UserError(f"{path} looks like a nanoGPT checkpoint but its weights do not map onto GPT-2 "
                        f"(first mismatch: {diff[0]}); export it to a Hugging Face GPT-2 folder and use that")
    if is_rank_zero():
        print(f"note: {path} is a nanoGPT checkpoint (iter {ckpt.get('iter_num', '?')}): converted; nanoGPT's "
              f"exact GELU becomes GPT-2's tanh approximation (outputs differ slightly)", file=sys.stderr)
    return {"model": sd, "model_args": dict(vars(config)), "sparse_layers": [], "sparsity_args": None,
            "converted_from": {"format": "nanogpt", "path": os.path.abspath(path),
                               "iter_num": ckpt.get("iter_num"), "best_val_loss": ckpt.get("best_val_loss")}}
