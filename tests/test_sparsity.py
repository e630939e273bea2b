"""sparsity.py against independent references: N:M masks, STE, SR-STE, SLoRB, Wanda, the swap and the check."""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sparsity import (SRSTEAdamW, SparseExpertWeight, SparseLinear, check_nm, nm_mask, nm_violations,
                      sparse_layers, sparsify, srste_lambda, unstructured_mask, update_masks)

patterns = st.integers(1, 8).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m)))


def reference_nm_mask(scores, n, m, ties="high"):
    """Per-group Python reference: sort by (-score, -index) ('high': of equal scores the higher index first) or
    (-score, index) ('low'), keep the first n."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    rows, cols = scores.shape
    sign = -1 if ties == "high" else 1
    for r in range(rows):
        for g in range(0, cols, m):
            order = sorted(range(g, g + m), key=lambda j: (-float(scores[r, j]), sign * j))
            for j in order[:n]:
                out[r, j] = True
    return out


@settings(max_examples=60, deadline=None)
@given(pattern=patterns, rows=st.integers(1, 6), groups=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_nm_mask_keeps_exactly_n_largest_per_group(pattern, rows, groups, seed):
    n, m = pattern
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, groups * m, generator=g)
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool
    assert (mask.reshape(-1, m).sum(-1) == n).all()
    assert torch.equal(mask, reference_nm_mask(scores, n, m))


@settings(max_examples=40, deadline=None)
@given(pattern=patterns, rows=st.integers(1, 5), groups=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_nm_mask_ties_go_to_the_higher_index_or_with_ties_low_to_the_lower(pattern, rows, groups, seed):
    n, m = pattern
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, groups * m), generator=g).float()  # many ties
    for ties in ("high", "low"):
        mask = nm_mask(scores, n, m, ties)
        assert torch.equal(mask, reference_nm_mask(scores, n, m, ties))
        assert torch.equal(mask, nm_mask(scores.clone(), n, m, ties))  # deterministic
    assert torch.equal(nm_mask(scores, n, m), nm_mask(scores, n, m, "high"))  # the default


def test_nm_mask_all_equal_keeps_the_last_n_or_the_first_n():
    assert nm_mask(torch.ones(2, 8), 2, 4).tolist() == [[False, False, True, True] * 2] * 2
    assert nm_mask(torch.ones(2, 8), 2, 4, "low").tolist() == [[True, True, False, False] * 2] * 2
    with pytest.raises(ValueError, match="unknown tie rule"):
        nm_mask(torch.ones(2, 8), 2, 4, "random")


def test_the_tie_rule_travels_with_the_layer_through_a_checkpoint_state():
    from checkpoint import build_model, model_state
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():  # a grid of weights: ties everywhere
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape).float())
    sparsify(model, ties="low")
    state = model_state(model)
    assert state["sparsity_args"]["ties"] == "low"
    rebuilt = build_model(state)
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(rebuilt)):
        assert b.ties == "low" and torch.equal(a.mask, b.mask)
        assert torch.equal(b.compute_mask(), reference_nm_mask(b.weight.detach().abs(), 2, 4, "low"))
    old = {**state, "sparsity_args": {k: v for k, v in state["sparsity_args"].items() if k != "ties"}}
    assert all(layer.ties == "low" for _, layer in sparse_layers(build_model(old)))  # before the setting existed


def test_nm_mask_works_on_higher_rank_tensors():
    scores = torch.randn(3, 5, 16)
    assert torch.equal(nm_mask(scores, 2, 4), reference_nm_mask(scores.reshape(15, 16), 2, 4).reshape(3, 5, 16))


@pytest.mark.parametrize("n,m,cols", [(3, 2, 8), (0, 4, 8), (2, 4, 6), (-1, 4, 8)])
def test_nm_mask_rejects_bad_patterns(n, m, cols):
    with pytest.raises(ValueError):
        nm_mask(torch.randn(2, cols), n, m)


def test_unstructured_masks_keep_largest_fraction():
    scores = torch.randn(8, 32)
    row = unstructured_mask(scores, 0.5, "row")
    assert (row.sum(-1) == 16).all()
    for r in range(8):
        assert scores[r][row[r]].min() > scores[r][~row[r]].max()
    layer = unstructured_mask(scores, 0.75, "layer")
    assert layer.sum() == 64
    assert scores[layer].min() > scores[~layer].max()


def test_nm_violations_counts_dense_groups():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm_violations(w, 2, 4) == 1
    assert nm_violations(w, 3, 4) == 0


# ---------------------------------------------------------------------------------------------- STE
def make_layer(in_f=16, out_f=8, seed=0, **kw):
    torch.manual_seed(seed)
    layer = SparseLinear.from_linear(nn.Linear(in_f, out_f), **kw)
    layer.init_mask_and_slorb()
    return layer


def test_forward_uses_masked_weight_and_ste_hands_gradient_to_all_weights():
    layer = make_layer()
    x = torch.randn(5, 16)
    # Independent reference: a plain linear on the masked weight as a leaf tensor.
    w_eff = (layer.weight.detach() * layer.mask).requires_grad_()
    ref = F.linear(x, w_eff, layer.bias.detach())
    ref.pow(2).sum().backward()
    out = layer(x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.pow(2).sum().backward()
    assert torch.allclose(layer.weight.grad, w_eff.grad, atol=1e-6)
    assert (layer.weight.grad[~layer.mask] != 0).any()  # pruned weights receive the gradient too


def test_masks_are_bool_buffers_in_state_dict():
    layer = make_layer()
    sd = layer.state_dict()
    assert sd["mask"].dtype == torch.bool and "mask" not in dict(layer.named_parameters())
    assert sd["init_mask"].dtype == torch.bool


def test_update_mask_reports_flips_since_last_and_since_initial():
    layer = make_layer(in_f=8, out_f=1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0, 4.0, 3.0, 2.0, 1.0]]))
    layer.init_mask_and_slorb()
    assert layer.mask.tolist() == [[True, True, False, False] * 2]
    with torch.no_grad():
        layer.weight[0, 3] = 10.0  # first group: keeps 0 and 3 now -> 2 flips
    flipped, since_init = layer.update_mask()
    assert (int(flipped), int(since_init)) == (2, 2)
    with torch.no_grad():
        layer.weight[0, 7] = 10.0  # second group flips too; first group unchanged since last
    flipped, since_init = layer.update_mask()
    assert (int(flipped), int(since_init)) == (2, 4)


# ---------------------------------------------------------------------------------------------- SR-STE
def test_srste_lambda_ramp():
    assert srste_lambda(0, 1e-4, 100) == 0.0
    assert srste_lambda(50, 1e-4, 100) == pytest.approx(5e-5)
    assert srste_lambda(100, 1e-4, 100) == pytest.approx(1e-4)
    assert srste_lambda(200, 1e-4, 100) == pytest.approx(1e-4)
    assert srste_lambda(0, 1e-4, 0) == pytest.approx(1e-4)  # increase_step 0: constant


@pytest.mark.parametrize("variant", ["paper", "classic"])
def test_srste_decay_only_touches_pruned_weights_and_shrinks_them(variant):
    layer = make_layer()
    before = layer.weight.detach().clone()
    opt = SRSTEAdamW([layer.weight], lr=1e-3, weight_decay=0.0, variant=variant, masked_modules=[layer])
    opt.param_groups[0]["srste_lambda"] = 1e-2
    layer.weight.grad = torch.zeros_like(layer.weight)  # isolate the decay from any loss gradient
    opt.step()
    after = layer.weight.detach()
    assert torch.equal(after[layer.mask], before[layer.mask])
    pruned_before, pruned_after = before[~layer.mask], after[~layer.mask]
    assert (pruned_after.abs() < pruned_before.abs()).all()
    assert (torch.sign(pruned_after) == torch.sign(pruned_before)).all()


def test_srste_zero_lambda_matches_torch_adamw_in_classic_form():
    layer = make_layer()
    ref = nn.Parameter(layer.weight.detach().clone())
    opt = SRSTEAdamW([layer.weight], lr=1e-2, weight_decay=0.1, variant="classic", masked_modules=[layer])
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for i in range(3):
        g = torch.randn_like(ref, generator=torch.Generator().manual_seed(i))
        layer.weight.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.allclose(layer.weight, ref, atol=1e-6)


def test_srste_paper_variant_matches_hand_computation():
    layer = make_layer(in_f=8, out_f=2)
    w = layer.weight.detach().clone()
    mask = layer.mask.clone()
    lr, b1, b2, eps, lam = 1e-2, 0.9, 0.95, 1e-8, 0.5
    opt = SRSTEAdamW([layer.weight], lr=lr, betas=(b1, b2), eps=eps, variant="paper", masked_modules=[layer])
    opt.param_groups[0]["srste_lambda"] = lam
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t in (1, 2):
        g = torch.randn_like(w, generator=torch.Generator().manual_seed(t))
        layer.weight.grad = g.clone()
        opt.step()
        d = lam * (~mask) * w
        m = b1 * m + (1 - b1) * g
        u = m / (1 - b1 ** t) + d
        v = b2 * v + (1 - b2) * u * u
        w = w - lr * u / ((v / (1 - b2 ** t)).sqrt() + eps)
    assert torch.allclose(layer.weight, w, atol=1e-6)


# ---------------------------------------------------------------------------------------------- SLoRB
def test_slorb_mean_init_preserves_each_groups_dense_sum():
    k = 4
    layer = make_layer(in_f=16, out_f=6, slorb_k=k, slorb_init="mean")
    effective = layer.weight * layer.mask + layer.slorb_delta()
    assert torch.allclose(effective.reshape(6, -1, k).sum(-1), layer.weight.reshape(6, -1, k).sum(-1), atol=1e-6)
    # and the forward really adds that residual
    x = torch.randn(3, 16)
    assert torch.allclose(layer(x), F.linear(x, effective, layer.bias), atol=1e-5)


def test_slorb_sum_init_is_k_times_mean():
    mean = make_layer(slorb_k=4, slorb_init="mean")
    total = make_layer(slorb_k=4, slorb_init="sum")
    assert torch.allclose(total.slorb_S, 4 * mean.slorb_S)


@pytest.mark.parametrize("init,trainable", list(itertools.product(["zero", "xavier"], [False, True])))
def test_slorb_zero_and_xavier_init_leave_the_sparse_output_unchanged(init, trainable):
    layer = make_layer(slorb_k=4, slorb_init=init, trainable_projection=trainable)
    x = torch.randn(3, 16)
    plain = F.linear(x, layer.weight * layer.mask, layer.bias)
    assert torch.allclose(layer(x), plain, atol=1e-6)


def test_slorb_fixed_and_trainable_projection_agree_at_init():
    fixed = make_layer(slorb_k=4, slorb_init="mean", trainable_projection=False)
    trained = make_layer(slorb_k=4, slorb_init="mean", trainable_projection=True)
    assert fixed.slorb_X is None and isinstance(trained.slorb_X, nn.Parameter)
    x = torch.randn(3, 16)
    assert torch.allclose(fixed(x), trained(x), atol=1e-6)
    assert torch.allclose(fixed.slorb_project(x), F.linear(x, trained.slorb_X), atol=1e-6)


def test_slorb_rejects_k_not_dividing_input():
    with pytest.raises(ValueError, match="does not divide"):
        SparseLinear(12, 4, slorb_k=5)


# ---------------------------------------------------------------------------------------------- model level
def test_sparsify_any_module_with_a_filter_and_wanda_from_dense_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(10, 8) * torch.linspace(0.1, 3, 8) for _ in range(3)]
    # independent reference: inputs of the second layer in the dense model
    with torch.no_grad():
        x1 = torch.cat(batches)
        x2 = torch.relu(model[0](x1))
    ref = [nm_mask(model[0].weight.abs() * x1.norm(dim=0), 2, 4),
           nm_mask(model[2].weight.abs() * x2.norm(dim=0), 2, 4)]
    names = sparsify(model, metric="wanda", filter_fn=lambda name, mod: True,
                     calibrate=lambda mdl: [mdl(b) for b in batches])
    assert names == ["0", "2"]
    assert torch.equal(model[0].mask, ref[0]) and torch.equal(model[2].mask, ref[1])
    assert not torch.equal(ref[0], nm_mask(model[0].weight.abs(), 2, 4))  # Wanda differs from magnitude here
    assert check_nm(model)[0]


def test_sparsify_default_filter_rejects_foreign_models():
    with pytest.raises(ValueError, match="filter"):
        sparsify(nn.Sequential(nn.Linear(8, 8)))


def test_wanda_without_calibration_is_an_error():
    with pytest.raises(ValueError, match="calibrate"):
        sparsify(nn.Sequential(nn.Linear(8, 8)), metric="wanda", filter_fn=lambda n, m: True)


def test_check_nm_detects_a_broken_mask():
    model = nn.Sequential(nn.Linear(8, 8))
    sparsify(model, filter_fn=lambda n, m: True)
    ok, rows = check_nm(model)
    assert ok and rows[0]["sparsity"] == pytest.approx(0.5) and rows[0]["pattern"] == "2:4"
    model[0].mask[0, :4] = True
    assert not check_nm(model)[0]


def test_update_masks_returns_flip_ratios():
    model = nn.Sequential(nn.Linear(8, 4))
    sparsify(model, filter_fn=lambda n, m: True)
    assert update_masks(model) == (0.0, 0.0)
    with torch.no_grad():
        layer = sparse_layers(model)[0][1]
        pruned = (~layer.mask).nonzero()[0]
        layer.weight[pruned[0], pruned[1]] = 100.0
    flip, since_init = update_masks(model)
    assert flip == pytest.approx(2 / 32) and since_init == pytest.approx(2 / 32)


class ToyExperts(nn.Module):
    """Experts held as one 3-D Parameter [experts, out, in], read by indexing in the forward (as transformers')."""

    def __init__(self):
        super().__init__()
        self.num_experts = 3
        self.w = nn.Parameter(torch.randn(3, 4, 8))

    def forward(self, x, expert):
        return F.linear(x, self.w[expert])


def test_expert_weights_are_masked_per_expert_in_their_owners_forward_and_srste_decays_only_pruned_entries():
    torch.manual_seed(0)
    toy = ToyExperts()
    w0 = toy.w.detach().clone()
    assert sparsify(toy, filter_fn=lambda name, param: True) == ["w"]
    layer = toy.w  # outside the forward the attribute is the sparse layer
    assert isinstance(layer, SparseExpertWeight) and layer.mask.shape == (3, 4, 8)
    # independently: in each expert's every row, the 2 largest |w| of each group of 4 inputs
    top = w0.abs().view(3, 4, 2, 4).topk(2, dim=-1).indices
    want = torch.zeros(3, 4, 2, 4, dtype=torch.bool).scatter_(-1, top, True).view(3, 4, 8)
    assert torch.equal(layer.mask, want) and check_nm(toy)[0]
    x = torch.randn(5, 8)
    torch.testing.assert_close(toy(x, 1), x @ (w0 * want)[1].T)
    # the paper's SR-STE step with no loss gradient on expert 0: its kept weights stay, its pruned ones shrink
    toy(x, 1).sum().backward()
    opt = SRSTEAdamW([layer.weight], lr=0.1, masked_modules=[layer])
    opt.param_groups[0]["srste_lambda"] = 1.0
    opt.step()
    w1 = layer.weight.detach()
    assert torch.equal(w1[0][want[0]], w0[0][want[0]])
    assert (w1[0][~want[0]].abs() < w0[0][~want[0]].abs()).all()
    assert not torch.equal(w1[1][want[1]], w0[1][want[1]])  # expert 1 got the loss gradient


def test_boundary_ties_marks_groups_whose_nth_and_next_scores_are_equal():
    from sparsity import boundary_ties

    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1, 0.8, 0.7, 0.1, 0.1], [1.0, 1.0, 1.0, 0.0, 4.0, 3.0, 2.0, 1.0]])
    assert boundary_ties(scores, 2, 4).tolist() == [[True, False], [True, False]]
    assert boundary_ties(scores, 1, 4).tolist() == [[False, False], [True, False]]
    assert boundary_ties(scores, 3, 4).tolist() == [[False, True], [False, False]]
