"""Checkpoints, and the one loader: a model of any family (dense or sparse, masks and SLoRB included) from a
checkpoint, an export folder or a Hugging Face folder.

A checkpoint is one torch file holding the model state (masks and SLoRB included), what is needed to rebuild
the model (its family and full config, the sparse layer names and their sparsify() arguments, its tokenizer),
and for training checkpoints the optimizer, iteration, RNG states of every rank, the run's config and the git
commit. Checkpoints written before model families existed (no "family" key) are GPT-2.

Under --parallel fsdp a checkpoint is a folder instead (torch.distributed.checkpoint): every rank writes its own
shards of the weights, masks and optimizer state, and extra.pt holds everything else. It is written under
NAME.tmp and swapped in only when complete; load_model() reads it in a single process, unsharded, so
export.py and evaluate.py take the folder directly.
"""
import json
import os
import random
import shutil
import subprocess
import warnings

import numpy as np
import torch

import families
from cli import REPO_ROOT, UserError
from data.tokenizer import folder_fingerprint, gpt2_fingerprint, has_hf_tokenizer
from model import resolve_model_path
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
        sparsify(model, filter_fn=lambda name, mod: name in names, init_masks=False, **state["sparsity_args"])
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


def _default_tokenizer(family, folder):
    if has_hf_tokenizer(folder):
        return {"dir": os.path.abspath(folder), "fingerprint": folder_fingerprint(folder)}
    # a GPT-2 folder without tokenizer files means GPT-2's own BPE; other families' cannot be guessed
    return {"dir": None, "fingerprint": gpt2_fingerprint() if family == "gpt2" else None}


def load_model(path: str, block_size=None, dtype=torch.float32, what="--model"):
    """The one loader: a model from a checkpoint file (.pt), an export folder (export.py / prune.py: masks and
    a separately kept SLoRB branch restored) or a Hugging Face folder of any supported family (or a GPT-2 name).

    what names the flag the path came from, for the error when it is none of these.
    """
    path = resolve_model_path(path)
    if os.path.isfile(path):
        model = build_model(load_checkpoint(path), block_size=block_size).to(dtype)
    elif sharded_checkpoint(path):
        model = load_sharded_model(sharded_checkpoint(path), block_size=block_size).to(dtype)
    elif os.path.isdir(path):
        model = families.from_pretrained(path, block_size=block_size, dtype=dtype)
        model.tokenizer_info = _default_tokenizer(model.family, path)
        if os.path.isfile(os.path.join(path, EXPORT_INFO)):
            restore_export(model, path)
    else:
        raise UserError(f"{what} {path} not found: pass a checkpoint (.pt), an export folder or a "
                        f"Hugging Face model folder (model_type {', '.join(families.SUPPORTED)})")
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


def save_checkpoint(obj: dict, path: str):
    """Write to a temporary name, then rename: a crash mid-write never corrupts the previous checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        # weights_only=False: our own checkpoints carry Python and NumPy RNG states (trusted files only).
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project (main.py or prune.py)")
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
