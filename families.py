"""Model families: what the rest of the project needs to know about a model, found from the model itself.

GPT-2 runs as model.GPT (nanoGPT, logits-exact with transformers). Any other decoder-only transformers model
(OPT, LLaMA-3, Qwen3, Gemma 3, Phi-3, OLMo 2, GPT-NeoX, Mixtral, ...: whatever AutoModelForCausalLM loads) runs
as the transformers *ForCausalLM model itself, held by HFCausalLM, a thin module with GPT's interface, so that
main.py, distill.py, evaluate.py and export.py never ask which family a model is:

    model.family                    its config's model_type: "gpt2", "opt", "llama", "qwen3_moe", ...
    model.config                    block_size (context), vocab_size, n_layer, n_embd (width of the features)
    model.blocks                    the transformer blocks, in order
    model.lm_head                   the head (weight, bias)
    model.features(idx, hidden)     final features (after the last norm, OPT-350m's project_out too),
                                    and with hidden=True each block's output
    model(idx, targets, ...)        GPT.forward: logits and the fused CE (loss.py)
    model.gradient_checkpointing    settable

Nothing is listed per family. Found from the loaded model: the base model (`base_model`: its last_hidden_state
is the final features), the decoder blocks (the nn.ModuleList under it of num_hidden_layers entries), and the
sparse layers: every nn.Linear inside a block (attention and MLP projections, fused or not) and every
mixture-of-experts weight [experts, out, in] inside a block; embeddings, norms, the head, routers and anything
outside the blocks (OPT's project_in/out) stay dense, as in AST, Wanda and SparseGPT. What genuinely differs
stays small and here: GPT-2's Conv1D layout (model.GPT), OPT's MLP held by the block itself (block_parts), heads
that scale the logits by a constant (folded into the features). For the one-shot baselines (prune.py): block
0's captured inputs, one block called on them (capture_block_inputs, call_block) and a block's attention and MLP
submodules (block_parts).
"""
import contextlib
import copy
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from cli import UserError, read_model_config
from model import GPT, GPTConfig
from sources import resolve
from sparsity import expert_weights

# Dropout is off for retraining, as for GPT-2 (and in the published recipe); these are the config keys.
_DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "resid_pdrop", "embd_pdrop",
                 "attn_pdrop", "hidden_dropout")
# Heads that multiply the logits by a constant after lm_head (Granite divides by logits_scaling, Cohere multiplies
# by logit_scale): the constant is folded into the final features, so the fused loss sees the same logits.
_LOGIT_DIVISORS, _LOGIT_MULTIPLIERS = ("logits_scaling",), ("logit_scale",)
# Where a config keeps its number of routed experts (a linear with that many outputs is a router: dense).
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# Where a config keeps its context length.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")


def _first_key(config, keys):
    return next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), (int, float))), None)


def _is_router(module, experts):
    """A linear scoring experts (out = the number of experts) or gating a shared expert (one output): dense."""
    return module.out_features == 1 or (experts is not None and module.out_features == experts)


def sparse_filter(model):
    """sparsify()'s filter_fn for this model: the linears and expert weights inside its blocks, routers excepted."""
    experts = _first_key(model.hf.config.get_text_config(), _EXPERT_COUNT_KEYS) if isinstance(model, HFCausalLM) \
        else None
    modules = {id(m) for block in model.blocks for m in block.modules()}
    params = {id(p) for block in model.blocks for p in block.parameters()}

    def chosen(name, module):
        if isinstance(module, nn.Linear):
            return id(module) in modules and not _is_router(module, experts)
        return isinstance(module, nn.Parameter) and id(module) in params  # an expert weight (sparsity.expert_weights)
    return chosen


@dataclass
class Shape:
    """What the project reads of a transformers model's config (GPTConfig has the same fields)."""
    block_size: int
    vocab_size: int
    n_layer: int
    n_embd: int


def find_blocks(hf) -> str:
    """The name (in hf) of the decoder blocks: the nn.ModuleList under the base model holding num_hidden_layers
    modules with linear layers inside. One-line errors for a model without one."""
    text = hf.config.get_text_config()
    n_layer = _first_key(text, ("num_hidden_layers", "n_layer", "num_layers"))
    base = hf.base_model
    prefix = next(name for name, module in hf.named_modules() if module is base)
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layer and \
                any(isinstance(m, nn.Linear) for m in module.modules()):
            return f"{prefix}.{name}" if prefix else name
    raise UserError(f"{type(hf).__name__} ({text.model_type}) has no recognisable decoder block list (an "
                    f"nn.ModuleList of num_hidden_layers = {n_layer} blocks holding linear layers under "
                    f"{type(base).__name__}): only decoder-only stacks of blocks are supported")


def _feature_scale(config) -> float:
    """The constant the head multiplies the logits by (1.0 for most models); refuses a non-linear soft cap."""
    if getattr(config, "final_logit_softcapping", None):
        raise UserError(f"{config.model_type}: final_logit_softcapping = {config.final_logit_softcapping} caps the "
                        "logits after lm_head, which the fused loss does not model: not supported")
    divisor, multiplier = _first_key(config, _LOGIT_DIVISORS), _first_key(config, _LOGIT_MULTIPLIERS)
    return (1.0 / divisor if divisor else 1.0) * (multiplier or 1.0)


class HFCausalLM(nn.Module):
    """A transformers *ForCausalLM behind GPT's interface (see the docstring above).

    The transformers model runs as it is, as `self.hf`; sparsify() swaps its block linears in place.
    """

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.family = hf.config.model_type
        self._checkpointing = False
        self._blocks_name = find_blocks(hf)
        text = hf.config.get_text_config()
        self.feature_scale = _feature_scale(text)
        self.config = Shape(block_size=_first_key(text, _CONTEXT_KEYS), vocab_size=text.vocab_size,
                            n_layer=len(self.blocks), n_embd=hf.get_output_embeddings().in_features)

    @property
    def lm_head(self):
        return self.hf.get_output_embeddings()

    @property
    def base(self):
        return self.hf.base_model

    @property
    def blocks(self):
        return self.hf.get_submodule(self._blocks_name)

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
        if self.feature_scale != 1.0:
            x = x * self.feature_scale
        return (x, hidden) if return_hidden else x

    forward = GPT.forward  # the same logits / fused-loss interface as GPT-2


def hf_name(model, name: str) -> str:
    """A module name of ours as transformers names it in a saved folder (HFCausalLM adds the 'hf.' prefix)."""
    return name[3:] if isinstance(model, HFCausalLM) and name.startswith("hf.") else name


def our_name(model, name: str) -> str:
    return "hf." + name if isinstance(model, HFCausalLM) else name


# ------------------------------------------------------------------------------------------------ folders
def read_hf_config(path) -> dict:
    """config.json of a local Hugging Face folder (one-line errors when it names no model_type)."""
    path = resolve(path).path
    hf = read_model_config(path)
    check_model_type(hf.get("model_type"), os.path.join(path, "config.json"))
    return hf


def check_model_type(model_type, where):
    if not model_type:
        raise UserError(f"{where} names no model_type: not a transformers model")


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
    """A dense model of any decoder-only family from a local Hugging Face folder, a .gguf file or a hub id
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
    check_model_type(loaded.config.model_type, source.path)
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
    if family == "gpt2":
        model = GPT(GPTConfig(**args))
    else:
        transformers = _quiet_transformers()
        args = {k: v for k, v in args.items() if k != "model_type"}
        try:
            config = _no_dropout(transformers.AutoConfig.for_model(family, **args))
            hf = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError as e:  # a model_type this transformers does not know, or not a causal LM
            raise UserError(f"cannot build a {family!r} model with transformers {transformers.__version__} "
                            f"({_first_line(e)})") from None
        model = HFCausalLM(hf.eval())
    return crop_context(model, block_size, "the checkpoint") if block_size else model


def save_pretrained(model, out, state_dict):
    """Write a Hugging Face folder of the model's own transformers class from a plain (nn.Linear) state dict of
    ours: GPT2LMHeadModel for GPT-2 (Conv1D layout), the original *ForCausalLM class otherwise."""
    if isinstance(model, HFCausalLM):
        sd = {hf_name(model, k): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if model.hf.config.get_text_config().tie_word_embeddings:  # the head is the embedding: stored once
            head_module = model.hf.get_output_embeddings()
            head = next(n for n, m in model.hf.named_modules(remove_duplicate=False) if m is head_module) + ".weight"
            if head in sd and torch.equal(sd[head], model.hf.get_input_embeddings().weight.detach().to("cpu")):
                del sd[head]
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
    """The (..., out, in) weight of a sparse layer in a transformers model, by the name export records: a block
    linear (GPT-2's Conv1D stores (in, out)) or a mixture-of-experts Parameter [experts, out, in]."""
    module, _, attr = name.rpartition(".")
    param = hf.get_submodule(module)._parameters.get(attr)
    if param is not None and param.dim() == 3:
        return param
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

    Pre-hooks on the blocks record them without knowing the family: the first batch of each size goes through
    the whole model, so that every block records what the model passes it (a sliding-window layer of Qwen2 gets
    another mask than a full-attention one), but with every block's computation replaced by handing its input
    on (what a block is passed besides the hidden states does not depend on their values), so it costs about
    the embeddings; every other batch stops at block 0.
    """
    blocks = list(model.blocks)
    hidden, calls = [], [{} for _ in blocks]
    stop = False
    # transformers 4.x decoder layers return a tuple (hidden states, ...), 5.x and GPT-2's blocks a tensor: the
    # pass-through returns what block 0 returns
    probe = tokens[:1]
    as_tuple = isinstance(_first_block_output(model, blocks[0], probe), tuple)

    def pass_through(x=None, *args, **kwargs):
        x = kwargs["hidden_states"] if x is None else x
        return (x,) if as_tuple else x

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
            for block in blocks if not stop else ():
                block.forward = pass_through  # an instance attribute: nn.Module.__call__ runs it after the hooks
            try:
                model.features(batch)
            except _StopForward:
                pass
            finally:
                for block in blocks:
                    block.__dict__.pop("forward", None)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(hidden), calls


def _first_block_output(model, block, tokens):
    """What block returns when the model calls it (a tensor or a tuple), from one forward that stops after it."""
    seen = []

    def hook(module, args, out):
        seen.append(out)
        raise _StopForward
    handle = block.register_forward_hook(hook)
    try:
        model.features(tokens)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


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
    """{"attn": Part, "mlp": Part} of one block (norms and residuals stay outside): its child holding linears whose
    name says attention, and its one other child holding linears (the MLP or mixture of experts). OPT's MLP is
    fc1 -> activation -> fc2 held by the block itself."""
    holders = [(name, child) for name, child in block.named_children()
               if any(isinstance(m, nn.Linear) for m in child.modules()) or expert_weights(child)]
    attn = [child for name, child in holders if "att" in name.lower()]
    if len(attn) != 1:
        raise UserError(f"--reconstruct: no single attention submodule in {type(block).__name__} (children "
                        f"holding linears: {', '.join(name for name, _ in holders)})")
    attn = attn[0]
    parts = {"attn": Part(attn, lambda args, kwargs: _first(attn(*args, **kwargs)), [attn])}
    if model.family == "opt":
        parts["mlp"] = Part(block.fc1, lambda args, kwargs: block.fc2(block.activation_fn(block.fc1(*args))),
                            [block.fc1, block.fc2])
        return parts
    mlp = [child for _, child in holders if child is not attn]
    if len(mlp) != 1:
        raise UserError(f"--reconstruct: no single MLP submodule in {type(block).__name__} (children holding "
                        f"linears: {', '.join(name for name, _ in holders)})")
    mlp = mlp[0]
    parts["mlp"] = Part(mlp, lambda args, kwargs: _first(mlp(*args, **kwargs)), [mlp])
    return parts
