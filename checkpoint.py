"""Checkpoints: atomic save, every RNG state, and rebuilding a (sparse) GPT from a checkpoint or HF folder.

A checkpoint is one torch file holding the model state (masks and SLoRB included), what is needed to rebuild
the model (GPT config, sparse layer names and their sparsify() arguments), and for training checkpoints the
optimizer, iteration, RNG states of every rank, the run's config and the git commit.
"""
import os
import random
import subprocess

import numpy as np
import torch

from cli import REPO_ROOT, UserError
from model import GPT, GPTConfig, resolve_model_path
from sparsity import layer_args, sparse_layers, sparsify

def model_state(model: GPT) -> dict:
    """What rebuilds the model: its weights, GPT config and the sparse layers with their arguments."""
    layers = sparse_layers(model)
    return {
        "model": {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},  # tied to wte
        "model_args": dict(vars(model.config)),
        "sparse_layers": [name for name, _ in layers],
        "sparsity_args": layer_args(layers[0][1]) if layers else None,
    }


def build_model(state: dict) -> GPT:
    """Inverse of model_state(): a GPT with the same sparse layers, masks and weights."""
    model = GPT(GPTConfig(**state["model_args"]))
    if state.get("sparse_layers"):
        names = set(state["sparse_layers"])
        sparsify(model, filter_fn=lambda name, mod: name in names, init_masks=False, **state["sparsity_args"])
    sd = dict(state["model"])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd)
    return model


def load_model(path: str, block_size=None) -> GPT:
    """A GPT from a checkpoint file (.pt, sparse or not) or a Hugging Face GPT-2 folder (or a model name)."""
    path = resolve_model_path(path)
    if os.path.isfile(path):
        model = build_model(load_checkpoint(path))
        if block_size is not None:
            if block_size > model.config.block_size:
                raise UserError(f"block_size {block_size} exceeds the context of {path} ({model.config.block_size})")
            model.config.block_size = block_size
            wpe = model.transformer.wpe
            wpe.weight = torch.nn.Parameter(wpe.weight.detach()[:block_size].clone())
        return model
    if os.path.isfile(os.path.join(path, "sparse_export.json")):
        # a folder written by export.py / prune.py: restore its masks and a separately kept SLoRB branch,
        # which a plain Hugging Face load would silently drop
        from export import load_hf_with_slorb
        return load_hf_with_slorb(path, block_size=block_size)
    return GPT.from_pretrained(path, block_size=block_size)


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
