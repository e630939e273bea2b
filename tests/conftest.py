"""Shared test fixtures: one CPU thread (several times faster for tiny models), tiny random GPT-2 folders."""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
torch.set_num_threads(1)

from cli import default_data_root  # noqa: E402


class GemmInputDtypes(TorchDispatchMode):
    """Records the dtypes of the two matrices of every GEMM that reaches the dispatcher: aten.mm and aten.bmm (a, b),
    aten.addmm (c, a, b), and aten.mm.dtype (a, b, out_dtype), the loss's bf16 GEMM with an fp32 result on CUDA,
    whose last argument is a dtype, not a tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            matrices = [a for a in args if isinstance(a, torch.Tensor)][-2:]
            self.seen.append((str(func), *(t.dtype for t in matrices)))  # e.g. ('aten.mm.dtype', bf16, bf16)
        return func(*args, **(kwargs or {}))


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it): torchrun runs of tests that run at the same time,
    under pytest-xdist, never share a rendezvous port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_root():
    root = default_data_root()
    if not os.path.isdir(root):
        pytest.skip(f"shared data folder {root} is absent (set SPARSE_GPT2_DATA)")
    return root


def save_tiny_gpt2(path, n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50257, seed=0):
    """A random Hugging Face GPT2LMHeadModel saved with save_pretrained: our stand-in for real GPT-2 weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab_size)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_gpt2"))
    save_tiny_gpt2(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(data_root, tmp_path_factory):
    """Small C4 train/val bins and the WikiText-2 test.bin, made by the project's own prepare scripts."""
    import subprocess

    out = tmp_path_factory.mktemp("data")
    c4 = os.path.join(data_root, "c4", "en")
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "data", "c4_dataset", "prepare.py"),
                    "--input", os.path.join(c4, "c4-train.00000-of-01024.head1000.json.gz"),
                    "--val_files", os.path.join(c4, "c4-validation.00000-of-00008.head1000.json.gz"),
                    "--max_docs", "100", "--out_dir", str(out / "c4")], check=True, capture_output=True)
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "data", "wikitext", "prepare.py"),
                    "--input", os.path.join(data_root, "wikitext2"), "--out_dir", str(out / "wikitext")],
                   check=True, capture_output=True)
    return {"data_dir": str(out / "c4"), "wikitext_dir": str(out / "wikitext")}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A 2-layer student and a 4-layer teacher (random Hugging Face GPT-2 folders, context 64)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_gpt2(str(root / "student"), n_positions=64, seed=0)
    save_tiny_gpt2(str(root / "teacher"), n_layer=4, n_positions=64, seed=1)
    return {"student": str(root / "student"), "teacher": str(root / "teacher")}


def gpt2_tokenizer(data_root):
    """The GPT-2 tokenizer from the shared data, as transformers loads it (any family's stand-in in tests)."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(os.path.join(data_root, "gpt2_tokenizer", "hf"))


def save_tiny_family(path, family, data_root=None, n_layer=2, hidden=32, ffn=64, heads=4, kv_heads=2, context=64,
                     seed=0, tokenizer=None, vocab_size=None, **extra):
    """A random Hugging Face *ForCausalLM folder of a family (opt, llama, mistral, qwen2), saved with
    save_pretrained, with a tokenizer beside it (the GPT-2 one unless given): our stand-in for real weights."""
    import transformers

    if family == "opt":
        cfg = transformers.OPTConfig(vocab_size=vocab_size or 50272, hidden_size=hidden, num_hidden_layers=n_layer, ffn_dim=ffn,
                                     num_attention_heads=heads, max_position_embeddings=context,
                                     word_embed_proj_dim=extra.pop("word_embed_proj_dim", hidden), **extra)
    else:
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
        cfg = cls(vocab_size=vocab_size or 50257, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layer,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    tok = tokenizer if tokenizer is not None else (gpt2_tokenizer(data_root) if data_root else None)
    if tok is not None:
        tok.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def family_models(data_root, tmp_path_factory):
    """Per family: a 2-block student and a 3-block, wider teacher (random, context 64, GPT-2 tokenizer beside)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in ("opt", "llama", "mistral", "qwen2"):
        out[family] = {"student": str(root / f"{family}_student"), "teacher": str(root / f"{family}_teacher")}
        save_tiny_family(out[family]["student"], family, data_root, seed=0)
        save_tiny_family(out[family]["teacher"], family, data_root, n_layer=3, hidden=48, ffn=96, heads=4,
                         kv_heads=4, seed=1)
    return out
