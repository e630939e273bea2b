"""Checkpoints: atomic, checksummed saves, every RNG state, and rebuilding a (sparse) GPT from a checkpoint.

A checkpoint is one torch file holding the model state (masks and SLoRB included), what is needed to rebuild
the model (GPT config, sparse layer names and their sparsify() arguments), and for training checkpoints the
optimizer, iteration, RNG states of every rank, the run's config and the git commit.

Every file is written under a temporary name, fsynced and renamed, and gets a `NAME.sha256` beside it
(`sha256sum -c` format) that load_checkpoint() verifies: a truncated or bit-flipped file is an error, never a
silently different model. main.py keeps the last K training checkpoints as out_dir/ckpt-ITER.pt; ckpt.pt is
the newest (a hard link to it, so it costs no space). nanoGPT's ckpt.pt files are recognised and converted.
"""
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys

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
    tmp = path + SUMS + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{d}  {os.path.basename(path)}\n" for d in digests)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path + SUMS)


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


def save_checkpoint(obj: dict, path: str) -> str:
    """Write to a temporary name, fsync, then rename: a crash or a full disk mid-write never touches the
    previous file. Writes path.sha256 beside it; returns the digest."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        _install(tmp, path, digest)
        return digest
    except (OSError, RuntimeError) as e:  # ENOSPC, EDQUOT, EIO...; torch reports a failed write as RuntimeError
        for leftover in (tmp, path + SUMS + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
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
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first})") from None


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
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {path} is a nanoGPT checkpoint (iter {ckpt.get('iter_num', '?')}): converted; nanoGPT's "
              f"exact GELU becomes GPT-2's tanh approximation (outputs differ slightly)", file=sys.stderr)
    return {"model": sd, "model_args": dict(vars(config)), "sparse_layers": [], "sparsity_args": None,
            "converted_from": {"format": "nanogpt", "path": os.path.abspath(path),
                               "iter_num": ckpt.get("iter_num"), "best_val_loss": ckpt.get("best_val_loss")}}
