"""Model families: what the rest of the project needs to know about GPT-2, OPT and the LLaMA layout.

Supported `model_type`s: gpt2, opt, llama, mistral, qwen2 (LLaMA, Mistral and Qwen2 share one layout). GPT-2
runs as model.GPT (nanoGPT, logits-exact with transformers). The other families run as the transformers
*ForCausalLM model itself, held by HFCausalLM, a thin module with GPT's interface, so that main.py, distill.py,
evaluate.py and export.py never ask which family a model is:

    model.family                    "gpt2", "opt", "llama", ...
    model.config                    block_size (context), vocab_size, n_layer, n_embd (width of the features)
    model.blocks                    the transformer blocks, in order
    model.lm_head                   the head (weight, bias)
    model.features(idx, hidden)     final features (after the last norm, OPT-350m's project_out too),
                                    and with hidden=True each block's output
    model(idx, targets, ...)        GPT.forward: logits and the fused CE (loss.py)
    model.gradient_checkpointing    settable

Per family here: the linears sparsify() swaps (embeddings, norms, the head and OPT's project_in/out stay
dense, as in AST, Wanda and SparseGPT), loading/saving local Hugging Face folders (offline only), and for the
one-shot baselines (prune.py) block 0's captured inputs, one block called on them (capture_block_inputs,
call_block) and a block's attention and MLP submodules (block_parts).
"""
import contextlib
import copy
import functools
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from cli import UserError, read_model_config
from model import GPT, GPTConfig
from sources import resolve

SUPPORTED = ("gpt2", "opt", "llama", "mistral", "qwen2")
_LLAMA_LINEARS = r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
# The block linears each family makes sparse, as a regex of module names (GPT-2 after the Conv1D transpose).
SPARSE_LINEARS = {
    "gpt2": r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$",
    "opt": r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)$",
    "llama": _LLAMA_LINEARS, "mistral": _LLAMA_LINEARS, "qwen2": _LLAMA_LINEARS,
}
# Where the base model (its output: the final features) and its list of blocks sit in the transformers model.
_BASE = {"opt": "model.decoder", "llama": "model", "mistral": "model", "qwen2": "model"}
# Dropout is off for retraining, as for GPT-2 (and in the published recipe); these are the config keys.
_DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "resid_pdrop", "embd_pdrop",
                 "attn_pdrop", "hidden_dropout")


def sparse_filter(model):
    """sparsify()'s filter_fn for this model's family: the block linears, nothing else."""
    pattern = re.compile(SPARSE_LINEARS[model.family])
    return lambda name, module: isinstance(module, nn.Linear) and bool(pattern.search(name))


@dataclass
class Shape:
    """What the project reads of a transformers model's config (GPTConfig has the same fields)."""
    block_size: int
    vocab_size: int
    n_layer: int
    n_embd: int


class HFCausalLM(nn.Module):
    """A transformers *ForCausalLM (OPT, LLaMA, Mistral, Qwen2) behind GPT's interface (see the docstring above).

    The transformers model runs as it is, as `self.hf`; sparsify() swaps its block linears in place.
    """

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.family = hf.config.model_type
        self._checkpointing = False
        self.config = Shape(block_size=hf.config.max_position_embeddings, vocab_size=hf.config.vocab_size,
                            n_layer=hf.config.num_hidden_layers, n_embd=hf.get_output_embeddings().in_features)

    @property
    def lm_head(self):
        return self.hf.get_output_embeddings()

    @property
    def base(self):
        return self.hf.get_submodule(_BASE[self.family])

    @property
    def blocks(self):
        return self.base.layers

    @property
    def gradient_checkpointing(self):
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        # transformers >= 5 renamed the switch; both recompute each block in the backward (non-reentrant)
        enable = getattr(self.hf, "activation_checkpointing_enable", None) or self.hf.gradient_checkpointing_enable
        disable = getattr(self.hf, "activation_checkpointing_disable", None) or self.hf.gradient_checkpointing_disable
        if on:
            enable({"use_reentrant": False})
        elif self._checkpointing:
            disable()
        self._checkpointing = bool(on)

    def features(self, idx, return_hidden=False):
        """Final features (B, T, n_embd); with return_hidden, also each block's output (for SquareHead)."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's context {self.config.block_size}")
        hidden, handles = [], []
        if return_hidden:
            def keep(module, args, out):
                hidden.append(out[0] if isinstance(out, tuple) else out)
            handles = [block.register_forward_hook(keep) for block in self.blocks]
        try:
            x = self.base(input_ids=idx, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        return (x, hidden) if return_hidden else x

    forward = GPT.forward  # the same logits / fused-loss interface as GPT-2


def hf_name(model, name: str) -> str:
    """A module name of ours as transformers names it in a saved folder (HFCausalLM adds the 'hf.' prefix)."""
    return name[3:] if isinstance(model, HFCausalLM) and name.startswith("hf.") else name


def our_name(model, name: str) -> str:
    return "hf." + name if isinstance(model, HFCausalLM) else name


# ------------------------------------------------------------------------------------------------ folders
def read_hf_config(path) -> dict:
    """config.json of a local Hugging Face folder of a supported family (one-line errors otherwise)."""
    path = resolve(path).path
    hf = read_model_config(path)
    check_family(hf.get("model_type"), os.path.join(path, "config.json"))
    return hf


def check_family(model_type, where):
    if model_type not in SUPPORTED:
        raise UserError(f"{where} has model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")


@functools.lru_cache(maxsize=None)
def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # no bars in log files
    return transformers


def _no_dropout(config):
    for key in _DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def crop_context(model, block_size, source):
    """Shrink (never grow) the context to block_size; GPT-2's position embeddings are cropped with it."""
    if block_size is not None:
        if block_size > model.config.block_size:
            raise UserError(f"block_size {block_size} exceeds the context of {source} ({model.config.block_size}); "
                            f"use --block_size {model.config.block_size} or less")
        model.config.block_size = block_size
        if isinstance(model, GPT):
            wpe = model.transformer.wpe
            wpe.weight = nn.Parameter(wpe.weight.detach()[:block_size].clone())
    return model


def from_pretrained(path, block_size=None, dtype=torch.float32):
    """A dense model of any supported family from a local Hugging Face folder, a .gguf file or a hub id
    (sources.resolve), with dropout off, fp32 by default."""
    source = resolve(path)
    if source.gguf_file:
        return crop_context(HFCausalLM(_load_gguf(source, dtype)), block_size, source.path)
    path = source.path
    family = read_hf_config(path)["model_type"]
    if family == "gpt2":
        return GPT.from_pretrained(path, block_size=block_size).to(dtype)
    transformers = _quiet_transformers()
    try:
        config = _no_dropout(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                               dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {path} with transformers ({_first_line(e)})") from None
    return crop_context(HFCausalLM(hf.eval()), block_size, path)


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextlib.contextmanager
def _no_bar_off_terminal():
    """transformers' GGUF reader draws a tqdm bar of its own that ignores disable_progress_bar(): hide it when
    stderr is no terminal (a log file), by giving that module a tqdm that is off for the duration."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _load_gguf(source, dtype):
    """A .gguf through transformers' GGUF loader, dequantised to dtype, as an ordinary *ForCausalLM.

    transformers marks a GGUF-loaded model as quantised and refuses to save it; the same weights in a fresh
    model of its class, built from its config without quantization_config, save (export, checkpoints) and load
    like any Hugging Face folder.
    """
    transformers = _quiet_transformers()
    try:
        with _no_bar_off_terminal():
            loaded = transformers.AutoModelForCausalLM.from_pretrained(**source.pretrained_args(), dtype=dtype)
    except ImportError as e:  # the gguf package
        raise UserError(f"reading {source.path} needs the gguf package ({_first_line(e)}): pip install gguf") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load {source.path} with transformers' GGUF loader ({_first_line(e)})") from None
    check_family(loaded.config.model_type, source.path)
    if loaded.config.model_type == "gpt2":
        raise UserError(f"{source.path}: GPT-2 from a .gguf file is not supported; pass its Hugging Face folder")
    config = _no_dropout(copy.deepcopy(loaded.config))
    del config.quantization_config
    with torch.device("meta"):  # no random initialisation: every tensor comes from the loaded model
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    for name, buffer in loaded.named_buffers():  # buffers outside the state dict (e.g. RoPE's inv_freq)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer)
    model.tie_weights()
    return model.to(dtype).eval()


def model_args(model) -> dict:
    """What from_config() rebuilds the (dense) model from: GPTConfig fields, or the full transformers config."""
    if isinstance(model, HFCausalLM):
        return model.hf.config.to_dict()
    return dict(vars(model.config))


def from_config(family, args, block_size=None):
    """A freshly initialised model of this family from model_args() (a checkpoint then loads its weights)."""
    if family not in SUPPORTED:
        raise UserError(f"model family {family!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if family == "gpt2":
        model = GPT(GPTConfig(**args))
    else:
        transformers = _quiet_transformers()
        args = {k: v for k, v in args.items() if k != "model_type"}
        config = _no_dropout(transformers.AutoConfig.for_model(family, **args))
        model = HFCausalLM(transformers.AutoModelForCausalLM.from_config(config).eval())
    return crop_context(model, block_size, "the checkpoint") if block_size else model


def save_pretrained(model, out, state_dict):
    """Write a Hugging Face folder of the model's own transformers class from a plain (nn.Linear) state dict of
    ours: GPT2LMHeadModel for GPT-2 (Conv1D layout), the original *ForCausalLM class otherwise."""
    if isinstance(model, HFCausalLM):
        sd = {hf_name(model, k): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        _quiet_transformers()
        model.hf.save_pretrained(out, state_dict=sd, safe_serialization=True)
        return
    plain = GPT(model.config)
    plain.load_state_dict(state_dict)
    plain.save_pretrained(out)


def load_transformers(path):
    """The saved folder as transformers itself loads it (AutoModelForCausalLM, no code of ours), in eval mode."""
    transformers = _quiet_transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                             dtype=torch.float32).eval()


def transformers_weight(hf, name):
    """The (out, in) weight of a block linear in a transformers model (GPT-2's Conv1D stores (in, out))."""
    w = hf.get_submodule(name).weight
    return w.t() if hf.config.model_type == "gpt2" else w


# ------------------------------------------------------------------------------------------------ block by block
# What the one-shot baselines (prune.py) need: block 0's inputs for the calibration windows, each block called
# on its own with whatever the model passes it besides the hidden states, and a block's two submodules.
class _StopForward(Exception):
    """Raised by a capture hook once the rest of the forward pass is not needed (Wanda's Catcher does the same)."""


@torch.no_grad()
def capture_block_inputs(model, tokens, batch_size):
    """(x, calls) for the block-by-block pruning loop, for any family.

    x: (nsamples, seqlen, C), block 0's input hidden states for every calibration window (embeddings, OPT's
    position embeddings and project_in included). calls[i][b]: block i's other call arguments, (args, kwargs),
    for a batch of b windows: transformers' decoder layers take the attention mask, position ids, rotary
    position embeddings (cos, sin), ...; GPT-2's blocks nothing. They depend only on the batch's shape (the
    windows are unpadded and of one length), so they are recorded once per batch size.

    Pre-hooks on the blocks record them without knowing the family: the first batch of each size runs the whole
    model, so that every block records what the model passes it (a sliding-window layer of Qwen2 gets another
    mask than a full-attention one); every other batch stops at block 0.
    """
    blocks = list(model.blocks)
    hidden, calls = [], [{} for _ in blocks]
    stop = False

    def recorder(i):
        def hook(module, args, kwargs):
            if args:
                x, args = args[0], args[1:]
            else:  # hidden states passed by name
                kwargs = dict(kwargs)
                x = kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(x)
            calls[i].setdefault(len(x), (args, kwargs))
            if stop:
                raise _StopForward
        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for i in range(0, len(tokens), batch_size):
            batch = tokens[i:i + batch_size]
            stop = len(batch) in calls[-1]  # every block's arguments for this batch size are known already
            try:
                model.features(batch)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(hidden), calls


def call_block(block, x, calls):
    """block(x) with the arguments the model passes it for a batch of len(x) windows (capture_block_inputs).

    transformers >= 5 decoder layers return the hidden states, 4.x a tuple (hidden states, ...): both work.
    """
    args, kwargs = calls[len(x)]
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Part:
    """A submodule of a block (its attention or its MLP), for local reconstruction after pruning.

    `entry` is the module whose input (args, kwargs) is the submodule's input (a pre-hook there captures it);
    run(args, kwargs) computes the submodule's output from that input (before the residual add);
    `modules` hold the linears reconstruction may change.
    """
    entry: nn.Module
    run: object
    modules: list


def block_parts(model, block) -> dict:
    """{"attn": Part, "mlp": Part} of one block of this model's family (norms and residuals stay outside)."""
    attn = block.attn if model.family == "gpt2" else block.self_attn
    parts = {"attn": Part(attn, lambda args, kwargs: _first(attn(*args, **kwargs)), [attn])}
    if model.family == "opt":  # OPT's MLP is fc1 -> activation -> fc2, held by the layer itself
        parts["mlp"] = Part(block.fc1, lambda args, kwargs: block.fc2(block.activation_fn(block.fc1(*args))),
                            [block.fc1, block.fc2])
    else:
        parts["mlp"] = Part(block.mlp, lambda args, kwargs: block.mlp(*args, **kwargs), [block.mlp])
    return parts
