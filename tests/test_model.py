"""model.py against Hugging Face's own GPT2LMHeadModel, and the sparse swap on a real GPT-2 layout."""
import json

import pytest
import torch
import torch.nn.functional as F

from cli import UserError
from conftest import save_tiny_gpt2
from model import GPT, GPT2_SHAPES, GPTConfig, read_hf_config
from sparsity import SparseLinear, check_nm, sparse_layers, sparsify


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpt2"))
    hf = save_tiny_gpt2(path, n_layer=3, n_head=4, n_embd=64, n_positions=64)
    return path, hf, GPT.from_pretrained(path).eval()


def test_logits_match_hugging_face(hf_and_ours):
    _, hf, ours = hf_and_ours
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, loss = ours(idx, targets=idx)
    assert logits.shape == ref.shape  # every position, not only the last, when targets are given
    assert (logits - ref).abs().max() <= 1e-4
    ref_loss = F.cross_entropy(ref.reshape(-1, ref.size(-1)), idx.reshape(-1))
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)


def test_last_position_shortcut_without_targets(hf_and_ours):
    _, hf, ours = hf_and_ours
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        logits, loss = ours(idx)
        assert loss is None and logits.shape == (1, 1, 50257)
        assert (logits[0, -1] - hf(idx).logits[0, -1]).abs().max() <= 1e-4


def test_block_hidden_states_match_hugging_face(hf_and_ours):
    _, hf, ours = hf_and_ours
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ref = hf(idx, output_hidden_states=True).hidden_states  # (embeddings, block 0, ..., ln_f(last))
        _, _, hidden = ours(idx, targets=idx, return_hidden=True)
    assert len(hidden) == 3
    for i in range(2):  # HF applies ln_f to its last entry, so compare the blocks before it
        assert (hidden[i] - ref[i + 1]).abs().max() <= 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(hf_and_ours):
    path, _, _ = hf_and_ours
    grads = []
    for ckpt in (False, True):
        model = GPT.from_pretrained(path).train()
        model.gradient_checkpointing = ckpt
        idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
        model(idx, targets=idx)[1].backward()
        grads.append(model.transformer.h[0].mlp.c_fc.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_save_pretrained_loads_in_transformers(hf_and_ours, tmp_path):
    from transformers import GPT2LMHeadModel

    _, hf, ours = hf_and_ours
    ours.save_pretrained(str(tmp_path))
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert (again(idx).logits - hf(idx).logits).abs().max() <= 1e-5


def test_block_size_crops_context_and_cannot_grow_it(hf_and_ours):
    path, _, _ = hf_and_ours
    assert GPT.from_pretrained(path, block_size=32).transformer.wpe.weight.shape[0] == 32
    with pytest.raises(UserError, match="exceeds the context"):
        GPT.from_pretrained(path, block_size=128)


@pytest.mark.parametrize("name,params", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_published_shapes_build_with_the_published_parameter_counts(name, params, tmp_path):
    cfg = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, **GPT2_SHAPES[name]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        model = GPT(read_hf_config(str(tmp_path)))
    assert sum(p.numel() for p in model.parameters()) == params


def test_clear_errors_for_bad_folders(tmp_path):
    with pytest.raises(UserError, match="not found"):
        GPT.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="only GPT-2"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 100, "n_layer": 1,
                                                      "n_head": 1, "n_embd": 8, "n_positions": 8}))
    with pytest.raises(UserError, match="no weights"):
        GPT.from_pretrained(str(tmp_path))


def test_sparsify_gpt_swaps_the_four_block_linears_and_round_trips_state_dict(hf_and_ours):
    path, _, _ = hf_and_ours
    model = GPT.from_pretrained(path).eval()
    names = sparsify(model, slorb_k=16, slorb_init="mean", trainable_projection=True)
    assert len(names) == 4 * 3
    assert not isinstance(model.lm_head, SparseLinear)
    assert {n.split(".", 3)[-1] for n in names} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    ok, rows = check_nm(model)
    assert ok and all(r["sparsity"] == pytest.approx(0.5) for r in rows)
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        logits = model(idx, targets=idx)[0]
    sd = model.state_dict()
    fresh = GPT(model.config)
    sparsify(fresh, slorb_k=16, slorb_init="mean", trainable_projection=True, init_masks=False)
    fresh.load_state_dict(sd)
    fresh.eval()
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(fresh)):
        assert torch.equal(a.mask, b.mask) and a.mask.dtype == torch.bool
    with torch.no_grad():
        assert torch.equal(fresh(idx, targets=idx)[0], logits)


def test_tied_lm_head_stays_tied_after_sparsify():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    sparsify(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt_loss_without_logits_equals_the_logits_path(hf_and_ours):
    path, _, _ = hf_and_ours
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for return_logits in (True, False):
        model = GPT.from_pretrained(path)
        logits, loss = model(idx, targets=idx, return_logits=return_logits)
        assert (logits is None) != return_logits
        loss.backward()
        losses.append(loss.item())
        grads.append(model.transformer.wte.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
