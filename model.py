"""GPT-2 in one file (nanoGPT lineage): the model, and loading/saving local Hugging Face GPT-2 folders.

The block linears are plain nn.Linear here; sparsity.sparsify() swaps them for SparseLinear afterwards,
so this file knows nothing about masks, DDP or checkpoints.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cli import UserError, read_model_config
from loss import cross_entropy
from sources import resolve


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5


# The four published shapes, for reference and for random-init presets.
GPT2_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused Q, K, V
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation; the exact erf GELU would drift from HF's logits.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    family = "gpt2"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    @property
    def blocks(self):
        return self.transformer.h

    def features(self, idx, return_hidden=False):
        """Final hidden states after ln_f, shape (B, T, n_embd); with return_hidden, also each block's output."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        hidden = []
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if return_hidden:
                hidden.append(x)
        x = self.transformer.ln_f(x)
        return (x, hidden) if return_hidden else x

    def forward(self, idx, targets=None, return_hidden=False, features_only=False, return_logits=True):
        """Returns (logits, loss), or (logits, loss, hidden) with return_hidden.

        With targets: logits for every position and the mean next-token cross-entropy (targets == -1 ignored);
        return_logits=False computes only the loss, through loss.cross_entropy (logits None), which never
        holds the (B·T, vocab) logits and is faster: the training loop's choice.
        Without targets: logits of the last position only (the generation shortcut), loss None.
        features_only: return features(idx, return_hidden) instead, so a loss that applies lm_head in chunks
        (distill.py) can still call the model through its DDP wrapper.
        """
        if features_only:
            return self.features(idx, return_hidden)
        out = self.features(idx, return_hidden)
        x, hidden = out if return_hidden else (out, None)
        if targets is not None and not return_logits:
            logits = None
            loss = cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                 bias=self.lm_head.bias)
        elif targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    # ------------------------------------------------------------------ Hugging Face folders
    @classmethod
    def from_pretrained(cls, path, block_size=None):
        """Load a local Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin).

        path may be a model name (gpt2, gpt2-medium, ...), resolved to the folder of that name in the project.

        Conv1D weights are stored (in, out) by Hugging Face and transposed here to nn.Linear's (out, in).
        block_size may shrink (never grow) the context, cropping the position embeddings.
        """
        path = resolve(path).path
        config = read_hf_config(path)
        if block_size is not None:
            if block_size > config.block_size:
                raise UserError(f"block_size {block_size} exceeds the context of {path} ({config.block_size}); "
                                f"use --block_size {config.block_size} or less")
            config.block_size = block_size
        sd = load_hf_state_dict(path)
        model = cls(config)
        try:
            model.load_state_dict(hf_to_ours(sd, config), strict=True)
        except (RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"weights in {path} do not match its config.json ({first}); re-save the folder") from None
        return model

    def save_pretrained(self, path, extra_config=None):
        """Write a Hugging Face GPT2LMHeadModel folder (config.json + model.safetensors, Conv1D layout)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        sd = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to wte
            if any(k.endswith(f"{name}.weight") for name in _CONV1D):
                v = v.t()
            sd[k] = v.detach().to("cpu", torch.float32).contiguous()
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        c = self.config
        hf = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "layer_norm_epsilon": c.layer_norm_epsilon,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "torch_dtype": "float32",
        }
        hf.update(extra_config or {})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def read_hf_config(path) -> GPTConfig:
    """The GPTConfig of a local Hugging Face GPT-2 folder (only standard GPT-2 shapes and options)."""
    cfg_file = os.path.join(path, "config.json")
    hf = read_model_config(path)
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{cfg_file} has model_type {hf.get('model_type')!r}; only GPT-2 models are supported")
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * hf["n_embd"]):
        raise UserError(f"{cfg_file}: n_inner={n_inner} is not 4*n_embd; only standard GPT-2 shapes are supported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{cfg_file}: activation {hf.get('activation_function')!r} is not GPT-2's gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise UserError(f"{cfg_file}: non-standard GPT-2 attention options are not supported")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0,
                     layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))


def load_hf_state_dict(path):
    st = os.path.join(path, "model.safetensors")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise UserError(f"no weights in {path}: expected model.safetensors or pytorch_model.bin (see gpt2/README.md)")


def hf_to_ours(sd, config: GPTConfig):
    """Map a Hugging Face GPT-2 state dict (with or without the 'transformer.' prefix) to ours."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; lm_head is tied to wte
        k = k if k.startswith("transformer.") else "transformer." + k
        if any(k.endswith(f"{name}.weight") for name in _CONV1D):
            v = v.t()
        out[k] = v.float().contiguous()
    out["transformer.wpe.weight"] = out["transformer.wpe.weight"][: config.block_size]
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
