"""Shared test fixtures: one CPU thread (several times faster for tiny models), tiny random GPT-2 folders."""
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
torch.set_num_threads(1)

from cli import default_data_root  # noqa: E402


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
