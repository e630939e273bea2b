"""bench.py: the tiny preset end to end (structure only, never timings), its timing helpers, and the
optimisations made for the benchmark targets, each against the straightforward code it replaced."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench
import bench_real
import sparsity
from cli import REPO_ROOT, UserError
from sparsity import SRSTEAdamW, SparseLinear, _keep_top, nm_mask, sparse_layers, sparsify, update_masks


# ---------------------------------------------------------------------------------------------- the tiny preset
TIMING_SECTIONS = ["prepare_throughput", "train_step", "components", "mask_recompute", "eval_throughput", "profile",
                   "train_step_bf16", "semi_structured"]  # in bench.SECTIONS order, as the run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench.py"), "--preset", "tiny",
                           "--only", ",".join(TIMING_SECTIONS), "--repeats", "1", "--warmup", "0",
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(out) as f:
        return json.load(f), done.stdout


def test_tiny_preset_prints_a_table_per_section_and_saves_them_as_json(tiny_run):
    results, stdout = tiny_run
    assert list(results) == ["meta"] + TIMING_SECTIONS
    for name in TIMING_SECTIONS:
        assert f"== {name} (" in stdout
        assert results[name], name
    meta = results["meta"]
    assert meta["preset"] == "tiny" and meta["threads"] == 1 and meta["device"] == "cpu"
    assert meta["repeats"] == 1 and "load_average_start" in meta and "load_average_end" in meta
    assert "fewer than 5 timed rounds" in stdout


def test_saved_results_render_as_markdown_tables_one_per_section(tiny_run, tmp_path):
    results, _ = tiny_run
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(results))
    text = bench.main(["--markdown", str(path)])
    assert text.startswith("### saved.json: preset tiny, cpu")
    for name in TIMING_SECTIONS:
        assert f"#### {name}" in text
    section = text.split("#### train_step\n")[1].split("####")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    columns = list(dict.fromkeys(k for row in results["train_step"] for k in row))
    assert table[0] == "| " + " | ".join(columns) + " |" and len(table) == 2 + len(results["train_step"])


def test_every_step_variant_is_a_ratio_to_the_dense_step_with_its_target(tiny_run):
    rows = {r["variant"]: r for r in tiny_run[0]["train_step"]}
    assert list(rows) == list(bench.STEP_VARIANTS)
    assert rows["dense"]["ratio"] == 1.0
    for name, row in rows.items():
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        target = bench.STEP_VARIANTS[name].target
        assert row["target"] == (target if target is not None else "")
        # a verdict holds for the whole min–max range over rounds, else the run does not decide it
        expected = "" if target is None else "yes" if row["ratio_max"] <= target else \
            "NO" if row["ratio_min"] > target else "undecided"
        assert row["met"] == expected, row


def test_figures_that_do_not_depend_on_the_machine_are_the_hand_computed_ones(tiny_run):
    """The tiny preset (2 blocks of width 64, one timed round): the weights the mask recompute covers are the
    block linears' 12 d^2 per block, and each ratio is the arithmetic of the seconds the same row records."""
    results = tiny_run[0]
    d, blocks = 64, 2
    for row in results["mask_recompute"]:
        assert row["weights"] == blocks * (3 * d * d + d * d + 4 * d * d + 4 * d * d) == 98_304
    for row in results["mask_recompute"][1:]:
        assert row["amortised_every_10_steps"] == round(row["ratio_vs_step"] / 10, 4)
    # one round: every ratio is that round's seconds over the dense step's (both rounded to 4 places in the row)
    dense = next(r for r in results["train_step"] if r["variant"] == "dense")["median_s"]
    for row in results["train_step"]:
        assert row["ratio_min"] == row["ratio"] == row["ratio_max"]
        rounding = 5e-5 / dense * (1 + row["median_s"] / dense) + 5e-4
        assert row["ratio"] == pytest.approx(row["median_s"] / dense, abs=rounding), row


def test_mask_recompute_is_a_ratio_to_a_training_step_for_both_metrics(tiny_run):
    rows = tiny_run[0]["mask_recompute"]
    assert [r["what"] for r in rows] == ["training step (masks variant)", "update_masks, magnitude",
                                         "update_masks, wanda"]
    assert all(r["layers"] == 8 for r in rows)  # 2 blocks x 4 linears
    assert all(r["target"] == 0.05 and "ratio_vs_step" in r for r in rows[1:])


def test_throughput_and_profile_sections_have_their_figures(tiny_run):
    results = tiny_run[0]
    assert [r["model"] for r in results["eval_throughput"]] == ["dense", "masks"]
    assert all(r["tokens_per_s"] > 0 for r in results["eval_throughput"])
    prepare = results["prepare_throughput"]
    if "skipped" not in prepare[0]:
        assert [r["num_proc"] for r in prepare] == [1, 2] and prepare[0]["tokens"] == prepare[1]["tokens"] > 0
    scopes = {r["scope"] for r in results["profile"]}
    assert scopes == {"train step: masks+srste+slorb", "train step: all", "update_masks (magnitude, all layers)"}


def test_gpu_only_sections_say_why_they_were_skipped_on_cpu(tiny_run):
    for name in ("train_step_bf16", "semi_structured"):
        assert "needs --device cuda" in tiny_run[0][name][0]["skipped"]


def test_step_memory_is_measured_in_a_fresh_process():
    r = bench.measure_step_memory("tiny", "masks", threads=1)
    assert r["method"] in ("VmHWM", "ru_maxrss")
    assert r["peak_mib"] >= r["state_mib"] > 0 and r["step_mib"] > 0


def test_unknown_sections_and_variants_are_one_line_errors():
    with pytest.raises(UserError, match="unknown section"):
        bench.main(["--only", "nope"])
    with pytest.raises(UserError, match="unknown variant"):
        bench.main(["--variants", "masks,nope"])
    with pytest.raises(UserError, match="unknown prune method"):
        bench.main(["--only", "prune", "--prune_methods", "wanda,obs"])


# ---------------------------------------------------------------------------------------------- timing helpers
def test_interleaved_runs_every_variant_each_round_alternating_and_drops_warmup():
    calls = []
    times = bench.interleaved({name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=2,
                              warmup=1)
    assert calls == list("abc") + list("cba") + list("abc")
    assert all(len(t) == 2 for t in times.values())


def test_paired_ratio_is_the_median_of_per_round_ratios():
    r = bench.paired_ratio([2.0, 3.0, 10.0], [1.0, 2.0, 4.0])
    assert r == {"ratio": 2.0, "ratio_min": 1.5, "ratio_max": 2.5}


def test_a_target_is_met_or_missed_only_by_the_whole_range_of_rounds():
    assert bench.verdict(0.95, 1.02, 1.03) == "yes"
    assert bench.verdict(0.90, 1.19, 1.10) == "undecided"  # the median may be below; some rounds are above
    assert bench.verdict(1.05, 1.20, 1.03) == "NO"
    assert bench.verdict(0.9, 1.2, None) == ""


# ---------------------------------------------------------------------------------------------- optimisations
def test_rank_based_nm_mask_equals_the_stable_sort_with_ties_signed_zeros_infinities_and_nan(monkeypatch):
    monkeypatch.setattr(sparsity, "RANK_PATH_MIN_GROUPS", 1)  # the rank path for these few groups too
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), -float("inf"), float("nan")])
    for m in range(1, 9):
        for n in range(1, m + 1):
            for high in (3, 7, 8):  # ties only; ties and infinities; and NaN (which takes the sort path)
                scores = values[torch.randint(0, high, (5, 4 * m), generator=g)]
                for ties in ("high", "low"):
                    expected = _keep_top(scores.reshape(-1, m), n, ties).reshape(scores.shape)
                    assert torch.equal(nm_mask(scores, n, m, ties), expected), (n, m, ties, scores)
    scores = torch.randn(64, 256, generator=g)
    assert torch.equal(nm_mask(scores, 2, 4), _keep_top(scores.reshape(-1, 4), 2, "high").reshape(scores.shape))


@torch.no_grad()
def reference_srste_step(opt):
    """SRSTEAdamW.step as first written: one tensor at a time, u = m / bc1 + d, step u / (sqrt(v / bc2) + eps)."""
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        lr, eps, wd, lam = group["lr"], group["eps"], group["weight_decay"], group["srste_lambda"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            owner = opt._owner.get(p)
            decay = p * ~owner.mask * lam if (owner is not None and lam != 0) else None
            grad = p.grad
            if decay is not None and opt.variant == "classic":
                grad = grad + decay
            if wd != 0:
                p.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - beta1)
            if owner is not None and opt.variant == "paper":
                u = m / bc1 if decay is None else m / bc1 + decay
                v.mul_(beta2).addcmul_(u, u, value=1 - beta2)
                p.addcdiv_(u, (v / bc2).sqrt_().add_(eps), value=-lr)
            else:
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                p.addcdiv_(m, (v / bc2).sqrt_().add_(eps), value=-lr / bc1)


@pytest.mark.parametrize("variant", ["paper", "classic"])
@pytest.mark.parametrize("lam", [0.0, 1e-2])
def test_foreach_srste_adamw_matches_the_per_tensor_reference(variant, lam):
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
        sparsify(model, filter_fn=lambda name, module: True, slorb_k=4)
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = SRSTEAdamW(groups, lr=1e-2, variant=variant, masked_modules=[l for _, l in sparse_layers(model)])
        models.append((model, opt))
    # the multi-tensor path GPUs run: batches of several tensors of at most 100 elements (one larger tensor alone)
    models[0][1].FOREACH_ELEMENTS = models[0][1].CPU_FOREACH_ELEMENTS = 100
    for step in range(6):
        x = torch.randn(8, 16)
        for i, (model, opt) in enumerate(models):
            for group in opt.param_groups:
                group["srste_lambda"] = lam
            model(x).pow(2).sum().backward()
            opt.step() if i == 0 else reference_srste_step(opt)
            opt.zero_grad()
            if step == 2:
                update_masks(model)  # the decay follows the masks as they change
    for a, b in zip(models[0][0].parameters(), models[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    trained = [p for p in models[0][0].parameters() if p.requires_grad]
    batches = [[p.numel() for p in batch] for batch in models[0][1]._batches(trained)]
    assert sorted(n for batch in batches for n in batch) == sorted(p.numel() for p in trained)
    assert max(len(b) for b in batches) > 1 and all(len(b) == 1 or sum(b) <= 100 for b in batches), batches


@pytest.mark.parametrize("trainable", [False, True])
def test_slorb_added_to_the_weight_equals_the_separate_low_rank_branch(trainable):
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(32, 12), slorb_k=8, trainable_projection=trainable)
    layer.init_mask_and_slorb()
    with torch.no_grad():
        layer.slorb_S.normal_()
    x = torch.randn(5, 32, requires_grad=True)
    y = layer(x)
    # the branch as first written: y = x (W ⊙ M)ᵀ + b + (x Xᵀ) Sᵀ, projection a reshape-and-sum when fixed;
    # the masked weight is a leaf, whose gradient the straight-through estimator hands to all of W
    w = (layer.weight * layer.mask).detach().requires_grad_()
    b, s = (p.detach().clone().requires_grad_() for p in (layer.bias, layer.slorb_S))
    x_ref = x.detach().clone().requires_grad_()
    X = layer.slorb_X.detach().clone().requires_grad_() if trainable else None
    proj = F.linear(x_ref, X) if trainable else x_ref.reshape(5, -1, 8).sum(-1)
    y_ref = F.linear(x_ref, w, b) + F.linear(proj, s)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.slorb_S.grad, s.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-5, atol=1e-6)  # STE: W gets all of it
    if trainable:
        torch.testing.assert_close(layer.slorb_X.grad, X.grad, rtol=1e-5, atol=1e-5)


def test_prune_section_times_every_method_per_block_against_one_dense_forward(tmp_path):
    results = bench.main(["--preset", "tiny", "--only", "prune", "--repeats", "1", "--warmup", "0",
                          "--out", str(tmp_path / "prune.json")])
    rows = results["prune"]
    assert [r["what"] for r in rows] == ["dense forward of the calibration set", *bench.PRUNE_METHODS]
    preset = bench.PRESETS["tiny"]
    for row in rows:
        assert row["model"] == f"OPT, {preset.n_layer} x {preset.n_embd}" and row["windows"] == preset.prune_windows
    for row in rows[1:]:
        assert row["seconds_per_block"] == pytest.approx(row["median_s"] / preset.n_layer, abs=1e-4)
        assert row["per_block_vs_dense_forward_min"] <= row["per_block_vs_dense_forward"] > 0
    assert json.load(open(tmp_path / "prune.json"))["prune"] == rows
    some = bench.main(["--preset", "tiny", "--only", "prune", "--repeats", "1", "--warmup", "0",
                       "--prune_methods", "sparsegpt,wanda", "--out", str(tmp_path / "some.json")])["prune"]
    assert [r["what"] for r in some] == ["dense forward of the calibration set", "wanda", "sparsegpt"]


# ---------------------------------------------------------------------------------------------- the real shapes
@pytest.fixture(scope="module")
def tiny_llama_run(tmp_path_factory):
    """bench.py --preset tiny-llama: both real-shape sections on a 2-block LLaMA of width 32, one round."""
    out = tmp_path_factory.mktemp("bench_real") / "tiny_llama.json"
    results = bench.main(["--preset", "tiny-llama", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert json.load(open(out)) == json.loads(json.dumps(results))
    return results


def test_real_step_times_main_py_steps_on_the_llama_shape_as_ratios_to_the_dense_step(tiny_llama_run):
    rows = tiny_llama_run["real_step"]
    assert [r["variant"] for r in rows] == list(bench_real.VARIANTS)
    timed = [r for r in rows if "skipped" not in r]
    assert [r["variant"] for r in timed][:3] == ["dense", "masks", "ast_boosted"]
    if len(timed) == 3:  # a CPU without bf16 instructions says so instead of timing an emulated bf16 teacher
        assert "avx512_bf16" in rows[-1]["skipped"] and not bench_real.cpu_has_bf16()
    # 2 blocks of q (32 x 32), k and v (16 x 32 each: 2 kv heads of 8), o (32 x 32), gate and up (64 x 32), down
    # (32 x 64); 2 windows of 32 tokens per step
    assert all(r["block_linear_weights"] == 2 * (32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 64 * 32) == 18_432
               and r["tokens"] == 64 for r in timed)
    dense = timed[0]["median_s"]
    for row in timed:  # one round: the ratio is the arithmetic of the two recorded seconds (4 places each)
        assert row["ratio_min"] == row["ratio"] == row["ratio_max"]
        assert row["ratio"] == pytest.approx(row["median_s"] / dense, abs=5e-5 / dense * (1 + row["ratio"]) + 5e-4)
        target = bench_real.VARIANTS[row["variant"]].target
        assert row["met"] == bench.verdict(row["ratio"], row["ratio"], target)


def test_real_prune_pairs_each_method_with_the_published_procedure_per_block(tiny_llama_run):
    rows = tiny_llama_run["real_prune"]
    assert [r["what"] for r in rows] == [f"{m}, {side}" for m in ("magnitude", "wanda", "sparsegpt")
                                         for side in ("prune.py", "published")]
    for row in rows:
        assert row["seconds_per_block"] == pytest.approx(row["median_s"] / 2, abs=1e-4)
    for ours, theirs in zip(rows[::2], rows[1::2]):
        ratio = ours["median_s"] / theirs["median_s"]
        assert ours["ours_vs_published"] == pytest.approx(ratio, abs=5e-5 / theirs["median_s"] * (1 + ratio) + 5e-4)
        assert ours["met"] == bench.verdict(ours["ours_vs_published"], ours["ours_vs_published"], 1.0)
    # the same decisions on both sides: exactly for magnitude (no ties in random weights), all but near-ties for
    # Wanda's and SparseGPT's statistics, which the two sides accumulate in another order
    same = {r["what"].split(",")[0]: r["same_decisions"] for r in rows[::2]}
    assert same["magnitude"] == 1.0 and same["wanda"] > 0.99 and same["sparsegpt"] > 0.99


def test_published_statistics_are_running_means_over_windows():
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))  # 3 windows of 5 tokens
    layer = nn.Linear(8, 4)
    norms, hessian = bench_real.ColumnNormMean(layer), bench_real.HessianMean(layer)
    for window in x:
        norms.add(window.unsqueeze(0))
        hessian.add(window.unsqueeze(0))
    torch.testing.assert_close(norms.value, x.pow(2).sum(1).mean(0))
    torch.testing.assert_close(hessian.value, 2 * torch.einsum("wti,wtj->ij", x, x) / 3)


def test_published_group_masks_prune_the_complement_of_nm_mask():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bench_real.topk_group_mask(scores, 2, 4), ~nm_mask(scores, 2, 4))


def test_real_sections_and_gpt2_presets_do_not_mix():
    with pytest.raises(UserError, match="real_step, real_prune run with --preset smollm2"):
        bench.main(["--preset", "tiny", "--only", "real_step"])
    with pytest.raises(UserError, match="every other section with a GPT-2 preset"):
        bench.main(["--preset", "tiny-llama", "--only", "train_step"])
