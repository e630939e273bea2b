"""One-shot baselines (prune.py: magnitude, Wanda, SparseGPT) and the trained GMP/IMP baselines of main.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

import main as main_mod
import prune
import results as results_mod
from checkpoint import build_model, load_checkpoint, load_model
from config import TrainConfig
from conftest import REPO_ROOT
from data.loader import load_calibration
from model import GPT
from sparsity import check_nm, nm_mask, pruning_fraction, sparse_layers, sparsify


@pytest.fixture(scope="module")
def calibration(data_root, tmp_path_factory):
    """8 windows of 64 tokens, cut by the project's own script from the shared C4 sample."""
    path = str(tmp_path_factory.mktemp("calib") / "calib.pt")
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "prepare_calibration_data.py"), "--input",
                    os.path.join(data_root, "c4", "en", "c4-train.00000-of-01024.head1000.json.gz"),
                    "--nsamples", "8", "--seqlen", "64", "--out", path], check=True, capture_output=True)
    return path


def calib_tokens(path):
    return load_calibration(path)[0]


def inputs_of(model, layer_name, tokens):
    """(tokens, in_features) inputs of one linear of the model on the calibration windows."""
    seen = []
    handle = model.get_submodule(layer_name).register_forward_pre_hook(
        lambda mod, inp: seen.append(inp[0].reshape(-1, inp[0].shape[-1]).detach()))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return torch.cat(seen)


# --------------------------------------------------------------------------------------------- SparseGPT layer
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_sparsegpt_with_identity_hessian_selects_exactly_the_magnitude_mask(n, m):
    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    new, keep = prune.sparsegpt_layer(W, torch.eye(256), n, m, blocksize=128)
    assert torch.equal(keep, nm_mask(W.abs(), n, m))
    # no correlation between inputs: nothing to compensate, kept weights are untouched
    assert torch.equal(new, W * keep)


def test_sparsegpt_lazy_block_updates_equal_the_column_by_column_algorithm():
    """Blocks of columns only defer the OBS updates; the result must not depend on --blocksize for N:M."""
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    X = torch.randn(300, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64) @ \
        torch.randn(64, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # correlated inputs
    H = (2 * X.t() @ X / 300).float()
    one, keep_one = prune.sparsegpt_layer(W.float(), H, 2, 4, blocksize=64)
    lazy, keep_lazy = prune.sparsegpt_layer(W.float(), H, 2, 4, blocksize=8)
    assert torch.equal(keep_one, keep_lazy)
    assert torch.allclose(one, lazy, atol=1e-4)
    assert not torch.equal(keep_one, nm_mask(W.float().abs(), 2, 4))  # correlations change the choice


def test_sparsegpt_unstructured_reaches_the_target_sparsity():
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    X = torch.randn(512, 256, generator=torch.Generator().manual_seed(2))
    new, keep = prune.sparsegpt_layer(W, 2 * X.t() @ X / 512, sparsity=0.75, blocksize=64)
    assert (~keep).float().mean().item() == pytest.approx(0.75)
    assert torch.equal(new == 0, ~keep | (W == 0))


def test_sparsegpt_zeroes_dead_inputs_and_stays_finite():
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    X = torch.randn(100, 16, generator=torch.Generator().manual_seed(4))
    X[:, 5] = 0  # an input channel that never fires on the calibration data
    new, keep = prune.sparsegpt_layer(W, 2 * X.t() @ X / 100, 2, 4)
    assert torch.isfinite(new).all() and (new[:, 5] == 0).all()
    assert (keep.reshape(-1, 4).sum(-1) == 2).all()


def test_sparsegpt_reconstructs_a_layer_better_than_magnitude_and_wanda(tiny_models, calibration):
    """‖XWᵀ − XŴᵀ‖ on block 0's c_fc, with the dense model's inputs on the calibration windows."""
    model = GPT.from_pretrained(tiny_models["student"]).eval()
    X = inputs_of(model, "transformer.h.0.mlp.c_fc", calib_tokens(calibration))
    W = model.transformer.h[0].mlp.c_fc.weight.detach()
    H = 2 * X.t() @ X / 8
    candidates = {
        "magnitude": W * nm_mask(W.abs(), 2, 4),
        "wanda": W * nm_mask(W.abs() * X.norm(dim=0), 2, 4),
        "sparsegpt": prune.sparsegpt_layer(W, H, 2, 4)[0],
    }
    err = {k: ((X @ W.t()) - (X @ w.t())).norm().item() for k, w in candidates.items()}
    assert err["sparsegpt"] < err["wanda"] and err["sparsegpt"] < err["magnitude"], err
    for w in candidates.values():
        assert ((w != 0).reshape(-1, 4).sum(-1) <= 2).all()


# --------------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("method", prune.METHODS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_each_method_gives_exact_nm_masks_with_pruned_weights_zero(method, n, m, tiny_models, calibration):
    model = GPT.from_pretrained(tiny_models["student"])
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    prune.prune_model(model, method, n, m, tokens=calib_tokens(calibration), batch_size=4, progress=False)
    ok, rows = check_nm(model)
    assert ok and len(rows) == 8 and all(r["sparsity"] == pytest.approx(1 - n / m) for r in rows)
    for name, layer in sparse_layers(model):
        assert (layer.weight[~layer.mask] == 0).all()
        assert torch.equal(layer.mask, layer.init_mask)
        kept_unchanged = torch.equal(layer.weight[layer.mask], dense[name + ".weight"][layer.mask])
        assert kept_unchanged == (method != "sparsegpt"), name  # only SparseGPT updates the kept weights
    assert torch.equal(model.transformer.wte.weight, dense["transformer.wte.weight"])  # embeddings stay dense


def test_wanda_and_sparsegpt_masks_differ_from_magnitude(tiny_models, calibration):
    tokens = calib_tokens(calibration)
    masks = {}
    for method in prune.METHODS:
        model = prune.prune_model(GPT.from_pretrained(tiny_models["student"]), method, tokens=tokens, progress=False)
        masks[method] = torch.cat([layer.mask.flatten() for _, layer in sparse_layers(model)])
    assert not torch.equal(masks["wanda"], masks["magnitude"])
    assert not torch.equal(masks["sparsegpt"], masks["magnitude"])


def test_statistics_of_later_blocks_come_from_the_already_pruned_earlier_blocks(tiny_models, calibration):
    """Block 1's Wanda statistic is Σx² of its inputs after the pruned block 0 (sequential, as published)."""
    tokens = calib_tokens(calibration)
    model = prune.prune_model(GPT.from_pretrained(tiny_models["student"]), "wanda", tokens=tokens, progress=False)
    dense = GPT.from_pretrained(tiny_models["student"])
    name = "transformer.h.1.attn.c_attn"
    pruned_x = inputs_of(model, name, tokens)  # the pruned model's block 0 feeds block 1
    dense_x = inputs_of(dense, name, tokens)
    got = model.get_submodule(name).input_sq
    assert torch.allclose(got, pruned_x.pow(2).sum(0), rtol=1e-4)
    assert not torch.allclose(got, dense_x.pow(2).sum(0), rtol=1e-3)


def test_unstructured_sparsity_per_method(tiny_models, calibration):
    for method in prune.METHODS:
        model = prune.prune_model(GPT.from_pretrained(tiny_models["student"]), method, sparsity=0.6,
                                  tokens=calib_tokens(calibration), progress=False)
        _, rows = check_nm(model)
        assert all(r["mask_type"] == prune.UNSTRUCTURED_SCOPE[method] for r in rows)
        assert all(r["sparsity"] == pytest.approx(0.6, abs=0.01) for r in rows), method


# --------------------------------------------------------------------------------------------- CLI
def test_cli_writes_a_checkpoint_that_main_and_evaluate_read(tiny_data, tiny_models, calibration, tmp_path):
    ckpt, results = str(tmp_path / "sgpt.pt"), str(tmp_path / "sgpt.json")
    res = prune.main(["--model", tiny_models["student"], "--method", "sparsegpt", "--calibration", calibration,
                      "--nsamples", "6", "--out", ckpt, "--wikitext_dir", tiny_data["wikitext_dir"],
                      "--ppl_windows", "2", "--data_dir", tiny_data["data_dir"], "--eval_iters", "2",
                      "--results", results, "--num_threads", "1", "--device", "cpu"])
    on_disk = json.load(open(results))
    assert on_disk == json.loads(json.dumps(res))
    for key in ("wikitext_ppl", "val_loss", "nm_ok", "mean_sparsity", "method", "tokens", "ppl_windows"):
        assert key in on_disk, key
    assert on_disk["nm_ok"] and on_disk["nsamples"] == 6 and on_disk["seqlen"] == 64 and on_disk["tokens"] == 0
    model = load_model(ckpt)
    assert check_nm(model)[0]
    # evaluate.py gives the same perplexity from the checkpoint
    from evaluate import main as evaluate_main
    ev = evaluate_main(["--model", ckpt, "--wikitext_dir", tiny_data["wikitext_dir"], "--ppl_windows", "2"])
    assert ev["wikitext_ppl"] == pytest.approx(res["wikitext_ppl"], rel=1e-5) and ev["nm_ok"]
    # main.py --init_from trains on from the one-shot model, masks intact
    trained = main_mod.main(["--config", "cpu_tiny", "--init_from", ckpt, "--data_dir", tiny_data["data_dir"],
                             "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(tmp_path / "run"),
                             "--max_iters", "2", "--eval_interval", "100", "--change_mask", "False",
                             "--srste_decay", "0"])
    assert trained["nm_ok"] and trained["iter"] == 2
    after = build_model(load_checkpoint(str(tmp_path / "run" / "ckpt.pt")))
    for (_, a), (_, b) in zip(sparse_layers(after), sparse_layers(model)):
        assert torch.equal(a.mask, b.mask)
    # and both land in the paper's table
    _, rows = results_mod.main(["--label", f"SparseGPT={results}", str(tmp_path / "run")])
    assert [r["training"] for r in rows] == ["no (sparsegpt)", "yes (AST)"]
    assert all(r["sparsity / N:M"].startswith("2:4 ✓") for r in rows)


def test_cli_writes_a_hugging_face_folder_with_exact_zeros(tiny_models, calibration, tmp_path):
    from transformers import GPT2LMHeadModel

    out = str(tmp_path / "wanda_hf")
    prune.main(["--model", tiny_models["student"], "--method", "wanda", "--calibration", calibration,
                "--out", out, "--wikitext_dir", "", "--device", "cpu"])
    hf = GPT2LMHeadModel.from_pretrained(out)
    for i in range(2):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = hf.transformer.h[i].get_submodule(name).weight.t()  # Conv1D is (in, out)
            assert ((w != 0).reshape(-1, 4).sum(-1) <= 2).all()
            assert (w == 0).float().mean() >= 0.5
    assert check_nm(load_model(out))[0]  # our loader restores the masks from the folder


def run_prune(*args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "prune.py"), *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_errors_are_one_line_with_exit_code_2(tiny_models, calibration, tmp_path):
    student = tiny_models["student"]
    cases = [
        (["--model", str(tmp_path / "nomodel"), "--method", "magnitude"], "not found"),
        (["--model", student, "--method", "wanda"], "needs --calibration"),
        (["--model", student, "--method", "sparsegpt"], "needs --calibration"),
        (["--model", student, "--method", "sparsegpt", "--calibration", str(tmp_path / "no.pt")], "not found"),
        (["--model", student, "--method", "magnitude", "--n", "5", "--m", "4"], "0 < N <= M"),
        (["--model", student, "--method", "magnitude", "--n", "2", "--m", "6"], "not divisible by M=6"),
        (["--model", student, "--method", "random"], "invalid choice"),
        (["--model", student, "--method", "wanda", "--calibration", calibration, "--nsamples", "99"], "holds only"),
    ]
    for argv, match in cases:
        proc = run_prune(*argv, "--wikitext_dir", "")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (argv, proc.stderr)
        assert lines[0].startswith("error: ") and match in lines[0] and "Traceback" not in proc.stderr, (argv, lines)


# --------------------------------------------------------------------------------------------- GMP / IMP
def pruned_share(model):
    """Pruned weights / the weights the full N:M mask prunes, over all sparse layers."""
    pruned = sum(int((~layer.mask).sum()) for _, layer in sparse_layers(model))
    total = sum(layer.mask.numel() * (layer.m - layer.n) // layer.m for _, layer in sparse_layers(model))
    return pruned / total


def hard_masked(tiny_models):
    """A student as main.py builds it for GMP/IMP: plain masked layers, masks all ones."""
    model = GPT.from_pretrained(tiny_models["student"])
    sparsify(model, ste=False, init_masks=False)
    return model


def test_gmp_fraction_follows_the_cubic_ramp_and_is_exactly_nm_at_prune_end(tiny_models):
    # the schedule itself (Zhu & Gupta): 1 - (1 - p)^3
    for step, expected in ((20, 1 - 0.75 ** 3), (30, 0.875), (40, 1 - 0.25 ** 3)):
        assert pruning_fraction(step, "gradual", 10, 50) == pytest.approx(expected)
    assert pruning_fraction(5, "gradual", 10, 50) == 0.0 and pruning_fraction(50, "gradual", 10, 50) == 1.0
    # applied to a model: the pruned share follows the ramp, pruned weights stay pruned, N:M at prune_end
    cfg = TrainConfig(prune_schedule="gradual", prune_start=0, prune_end=40, mask_update_interval=10)
    model, current, before = hard_masked(tiny_models), 0.0, None
    for step in (10, 20, 30):
        current = main_mod.apply_pruning_schedule(model, cfg, step, current)
        assert current == pytest.approx(1 - (1 - step / 40) ** 3)
        assert pruned_share(model) == pytest.approx(current, abs=1e-3)
        assert not check_nm(model)[0]
        masks = [layer.mask.clone() for _, layer in sparse_layers(model)]
        if before is not None:
            assert all(not (m & ~b).any() for m, b in zip(masks, before))  # nothing grows back
        before = masks
    assert main_mod.apply_pruning_schedule(model, cfg, 35, current) == current  # not a pruning step
    assert main_mod.apply_pruning_schedule(model, cfg, 40, current) == 1.0
    assert check_nm(model)[0] and pruned_share(model) == 1.0
    for _, layer in sparse_layers(model):
        assert (layer.weight[~layer.mask] == 0).all()


def test_imp_prunes_in_equal_rounds_and_is_exactly_nm_at_prune_end(tiny_models):
    # 3 rounds over [0, 20]: at steps 0, 10 and 20
    expected = {0: 1 / 3, 5: 1 / 3, 10: 2 / 3, 19: 2 / 3, 20: 1.0, 30: 1.0}
    for step, frac in expected.items():
        assert pruning_fraction(step, "iterative", 0, 20, rounds=3) == pytest.approx(frac)
    cfg = TrainConfig(prune_schedule="iterative", prune_start=0, prune_end=20, prune_rounds=3)
    model, current = hard_masked(tiny_models), 0.0
    for step in (0, 10, 15, 20):
        current = main_mod.apply_pruning_schedule(model, cfg, step, current)
        assert pruned_share(model) == pytest.approx(expected.get(step, 2 / 3), abs=1e-3)
    assert check_nm(model)[0]


@pytest.mark.parametrize("schedule", ["gradual", "iterative"])
def test_gmp_and_imp_train_with_distillation_and_end_exactly_nm(schedule, tiny_data, tiny_models, tmp_path):
    out = tmp_path / schedule
    res = main_mod.main(["--config", "cpu_tiny", "--student_model", tiny_models["student"],
                         "--teacher_model", tiny_models["teacher"], "--data_dir", tiny_data["data_dir"],
                         "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(out),
                         "--prune_schedule", schedule, "--prune_start", "0", "--prune_end", "6",
                         "--prune_rounds", "3", "--mask_update_interval", "2", "--distill_model", "True",
                         "--eval_interval", "100", "--max_iters", "6"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = {r["iter"]: r["pruned_fraction"] for r in rows if "pruned_fraction" in r}
    assert all("kl" in r for r in rows if "loss" in r)  # the distillation loss was on
    if schedule == "gradual":  # pruning steps every mask_update_interval: three points of the ramp
        ramp = [pruning_fraction(it, "gradual", 0, 6) for it in (2, 4, 6)]
        assert ramp == pytest.approx([1 - (2 / 3) ** 3, 1 - (1 / 3) ** 3, 1.0])
        assert [logged[i] for i in range(1, 7)] == pytest.approx([0, ramp[0], ramp[0], ramp[1], ramp[1], 1.0])
    else:  # rounds at 0, 3 and 6
        assert [logged[i] for i in range(1, 7)] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1.0])
    model = build_model(load_checkpoint(str(out / "ckpt.pt")))
    assert check_nm(model)[0] and pruned_share(model) == 1.0
    assert res["nm_ok"] and res["mean_sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["gradual", "iterative"])
def test_gmp_and_imp_pruned_weights_and_their_adam_moments_stay_exactly_zero(schedule, tiny_data, tiny_models,
                                                                             tmp_path):
    # pruning ends at step 4 of 8: AdamW's momentum and weight decay would move the stored pruned weights again
    # in the four steps after it unless their optimizer state is zeroed with them
    out = tmp_path / schedule
    main_mod.main(["--config", "cpu_tiny", "--student_model", tiny_models["student"], "--data_dir",
                   tiny_data["data_dir"], "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(out),
                   "--prune_schedule", schedule, "--prune_start", "0", "--prune_end", "4", "--prune_rounds", "2",
                   "--mask_update_interval", "1", "--eval_interval", "100", "--max_iters", "8",
                   "--learning_rate", "1e-2"])
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    model = build_model(ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    params = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]  # main.py's two groups
    indices = [i for group in ckpt["optimizer"]["param_groups"] for i in group["params"]]
    assert len(indices) == len(params)
    state = {id(p): ckpt["optimizer"]["state"][i] for p, i in zip(params, indices)}
    layers = sparse_layers(model)
    assert layers and check_nm(model)[0]
    for name, layer in layers:
        pruned = ~layer.mask
        assert pruned.any() and (layer.weight[pruned] == 0).all(), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (state[id(layer.weight)][moment][pruned] == 0).all(), (name, moment)
        assert (layer.weight[layer.mask] != 0).all(), name  # the kept ones did train
