"""prune.py on every model family: the published Wanda / SparseGPT loop, N:M after export and reload, local
reconstruction, resuming training from a pruned checkpoint, determinism.

Tiny random OPT / LLaMA / Mistral / Qwen2 folders (conftest.family_models) with calibration windows cut by the
project's own script with each folder's own tokenizer.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

import families
import main as main_mod
import prepare_calibration_data
import prune
from checkpoint import build_model, load_checkpoint, load_model
from cli import UserError
from data.loader import load_calibration
from sparsity import check_nm, nm_mask, sparse_layers

ALL = ("opt", "llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def calibrations(family_models, data_root, tmp_path_factory):
    """Per family: 8 windows of 64 tokens of the shared C4 sample, tokenised with the student folder's tokenizer."""
    root = tmp_path_factory.mktemp("family_calib")
    c4 = os.path.join(data_root, "c4", "en", "c4-train.00000-of-01024.head1000.json.gz")
    out = {}
    for family in ALL:
        out[family] = str(root / f"{family}.pt")
        prepare_calibration_data.main(["--input", c4, "--tokenizer", family_models[family]["student"],
                                       "--nsamples", "8", "--seqlen", "64", "--seed", "0", "--out", out[family]])
    return out


def tokens_of(path):
    return load_calibration(path)[0]


def hf_layers(hf):
    return hf.model.decoder.layers if hf.config.model_type == "opt" else hf.model.layers


def load_hf(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------- the published algorithms
@torch.no_grad()
def published_loop(hf, tokens, method, n=2, m=4, percdamp=0.01):
    """Wanda's and SparseGPT's published loop, written out straight on the transformers model: a Catcher on
    layer 0 takes each window's input (one window per forward) and the layer's keyword arguments; then per
    layer: one dense forward with hooks on every nn.Linear, each linear pruned (Wanda: |W|·sqrt(Σx²) scores,
    the m − n smallest of each group of m zeroed; SparseGPT: OBS column by column, in float64 here), and the
    pruned layer's outputs become the next layer's inputs."""
    layers = hf_layers(hf)
    inps, cache = [], {}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, **kwargs):
            inps.append(x)
            cache.update(kwargs)
            raise ValueError

    layers[0] = Catcher(layers[0])
    for window in tokens:
        try:
            hf(window[None], use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module

    def forward(layer, x):
        out = layer(x, **cache)
        return out[0] if isinstance(out, tuple) else out

    for layer in layers:
        linears = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        stats = {name: {"n": 0, "sq": 0.0, "H": 0.0} for name in linears}

        def hook(name):
            def add(mod, inp, out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()  # one window: (seqlen, in)
                s = stats[name]
                s["n"] += 1
                s["sq"] = s["sq"] + x.pow(2).sum(0)
                s["H"] = s["H"] + 2 * x.t() @ x
            return add

        handles = [mod.register_forward_hook(hook(name)) for name, mod in linears.items()]
        for x in inps:
            forward(layer, x)
        for h in handles:
            h.remove()
        for name, mod in linears.items():
            W = mod.weight.double()
            if method == "wanda":
                score = W.abs() * stats[name]["sq"].sqrt()
                pruned = torch.zeros_like(W, dtype=torch.bool)
                for i in range(0, W.shape[1], m):
                    pruned.scatter_(1, i + torch.topk(score[:, i:i + m], m - n, dim=1, largest=False)[1], True)
                mod.weight.copy_((W * ~pruned).float())
            else:
                mod.weight.copy_(obs_column_by_column(W.clone(), stats[name]["H"] / stats[name]["n"], n, m,
                                                      percdamp).float())
        inps = [forward(layer, x) for x in inps]
    return hf


def obs_column_by_column(W, H, n, m, percdamp):
    """SparseGPT (Frantar & Alistarh 2023) without its lazy column blocks: for each group of m columns choose the
    m − n smallest w² / [H⁻¹]²_jj, then for each column zero its pruned weights and spread the error over the
    remaining columns through the upper Cholesky factor of H⁻¹."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if i % m == 0:
            score = W[:, i:i + m] ** 2 / torch.diag(Hinv)[i:i + m].unsqueeze(0) ** 2
            pruned.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False)[1], True)
        q = W[:, i].masked_fill(pruned[:, i], 0.0)
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) @ Hinv[i, i:].unsqueeze(0)
        W[:, i] = q
    return W


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_wanda_and_sparsegpt_give_the_published_algorithms_weights(family, method, family_models, calibrations):
    student, tokens = family_models[family]["student"], tokens_of(calibrations[family])
    ours = prune.prune_model(load_model(student), method, tokens=tokens, batch_size=3, progress=False)
    reference = published_loop(load_hf(student), tokens, method)
    names = [name for name, _ in sparse_layers(ours)]
    assert len(names) == 2 * (6 if family == "opt" else 7)
    for name in names:
        layer = ours.get_submodule(name)
        want = reference.get_submodule(families.hf_name(ours, name)).weight
        assert torch.equal(layer.mask, want != 0), name  # the same weights pruned
        assert torch.allclose(layer.weight, want, rtol=1e-4, atol=1e-6), (name, (layer.weight - want).abs().max())
    if method == "sparsegpt":  # the kept weights moved (error compensation): the comparison is not vacuous
        dense = load_hf(student)
        moved = [(dense.get_submodule(families.hf_name(ours, n)).weight != ours.get_submodule(n).weight)
                 [ours.get_submodule(n).mask].float().mean() for n in names]
        assert min(moved) > 0.5


# ------------------------------------------------------------------------------------- every method, every family
@pytest.mark.parametrize("family", ALL)
def test_each_method_is_exactly_nm_with_pruned_weights_zero_and_embeddings_untouched(family, family_models,
                                                                                     calibrations):
    student, tokens = family_models[family]["student"], tokens_of(calibrations[family])
    dense = load_model(student).state_dict()
    for method in prune.METHODS:
        for recon in (None, prune.Reconstruction(epochs=2, lr=1e-3)):
            model = prune.prune_model(load_model(student), method, tokens=tokens, batch_size=4, reconstruct=recon,
                                      progress=False)
            ok, rows = check_nm(model)
            assert ok and len(rows) == len(list(model.blocks)) * (6 if family == "opt" else 7), (method, recon)
            for name, layer in sparse_layers(model):
                assert (layer.weight[~layer.mask] == 0).all() and torch.equal(layer.mask, layer.init_mask)
            untouched = [k for k in dense if "embed" in k or "norm" in k]
            assert untouched and all(torch.equal(model.state_dict()[k], dense[k]) for k in untouched)


def test_unstructured_sparsity_per_method_on_opt(family_models, calibrations):
    for method in prune.METHODS:
        model = prune.prune_model(load_model(family_models["opt"]["student"]), method, sparsity=0.6,
                                  tokens=tokens_of(calibrations["opt"]), progress=False)
        _, rows = check_nm(model)
        assert len(rows) == 12 and all(r["mask_type"] == prune.UNSTRUCTURED_SCOPE[method] for r in rows)
        assert all(r["sparsity"] == pytest.approx(0.6, abs=0.01) for r in rows), method


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_export_folder_is_the_same_transformers_class_exactly_nm_after_reload(family, family_models, calibrations,
                                                                              tmp_path):
    student = family_models[family]["student"]
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = str(tmp_path / method)
        prune.main(["--model", student, "--method", method, "--calibration", calibrations[family], "--out", out,
                    "--wikitext_dir", "", "--reconstruct", str(method == "wanda"), "--recon_epochs", "1",
                    "--device", "cpu"])
        hf = load_hf(out)
        assert type(hf).__name__ == {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM"}[family]
        linears = [(n, mod) for n, mod in hf.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"]
        assert len(linears) == 2 * (6 if family == "opt" else 7)
        for name, mod in linears:
            w = mod.weight
            assert ((w != 0).reshape(-1, 4).sum(-1) <= 2).all() and (w == 0).float().mean() >= 0.5, (method, name)
        reloaded = load_model(out)  # our loader gives the masks back
        assert check_nm(reloaded)[0] and len(sparse_layers(reloaded)) == len(linears)


# ------------------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def block_errors_on_dense_inputs(dense_dir, pruned, tokens):
    """Per block: ‖pruned block(x) − dense block(x)‖² / ‖dense block(x)‖² on the inputs x that the DENSE
    transformers model gives that block (captured with its own hooks), the same inputs for every model compared."""
    hf = load_hf(dense_dir)
    seen = {i: [] for i in range(len(hf_layers(hf)))}
    handles = [layer.register_forward_pre_hook(lambda mod, a, k, i=i: seen[i].append((a, k)), with_kwargs=True)
               for i, layer in enumerate(hf_layers(hf))]
    hf(tokens, use_cache=False)
    for h in handles:
        h.remove()
    errors = []
    for i, (dense_layer, pruned_layer) in enumerate(zip(hf_layers(hf), pruned.blocks)):
        (args, kwargs), = seen[i]
        want, got = dense_layer(*args, **kwargs), pruned_layer(*args, **kwargs)
        want, got = (want[0] if isinstance(want, tuple) else want), (got[0] if isinstance(got, tuple) else got)
        errors.append(float((got - want).pow(2).sum() / want.pow(2).sum()))
    return errors


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_reconstruction_lowers_the_block_output_error_of_plain_wanda_with_the_same_masks(family, family_models,
                                                                                       calibrations):
    student, tokens = family_models[family]["student"], tokens_of(calibrations[family])
    plain_report, recon_report = [], []
    plain = prune.prune_model(load_model(student), "wanda", tokens=tokens, batch_size=4, progress=False,
                              report=plain_report)
    recon = prune.prune_model(load_model(student), "wanda", tokens=tokens, batch_size=4, progress=False,
                              reconstruct=prune.Reconstruction(epochs=4, lr=1e-3), report=recon_report)
    dense = load_model(student)
    for (name, a), (_, b) in zip(sparse_layers(plain), sparse_layers(recon)):
        # the mask is Wanda's from the block's inputs (the reconstructed earlier blocks' outputs), kept fixed
        w = dense.get_submodule(name).weight
        assert torch.equal(b.mask, nm_mask(w.abs() * b.input_sq.sqrt(), 2, 4)), name
        assert torch.equal(a.mask, b.mask) or ".layers.0." not in name  # block 0: the same inputs, the same mask
        assert (b.weight[~b.mask] == 0).all()
        assert not torch.equal(a.weight, b.weight), name  # ... and the kept weights were retrained
    plain_err = block_errors_on_dense_inputs(student, plain, tokens)
    recon_err = block_errors_on_dense_inputs(student, recon, tokens)
    assert all(r < 0.8 * p for r, p in zip(recon_err, plain_err)), (plain_err, recon_err)
    # prune.py's own report says the same, and each reconstructed part got better on its own targets
    assert all(r["output_error"] < p["output_error"] for r, p in zip(recon_report, plain_report))
    assert all(row[part][1] < row[part][0] for row in recon_report for part in ("attn", "mlp"))
    assert recon_report[0]["output_error"] == pytest.approx(recon_err[0], rel=1e-3)  # block 0: the same inputs


def test_recon_parts_trains_only_the_chosen_submodule(family_models, calibrations):
    student, tokens = family_models["llama"]["student"], tokens_of(calibrations["llama"])
    dense = load_model(student)
    attn_only = prune.prune_model(load_model(student), "wanda", tokens=tokens, progress=False,
                                  reconstruct=prune.Reconstruction(epochs=1, lr=1e-3, parts=("attn",)))
    for name, layer in sparse_layers(attn_only):
        kept_as_dense = torch.equal(layer.weight, dense.get_submodule(name).weight * layer.mask)
        assert kept_as_dense == (".mlp." in name), name


# ------------------------------------------------------------------------------------- CLI
def test_pruned_opt_checkpoint_evaluates_and_resumes_training_with_identical_masks(family_models, calibrations,
                                                                                  tiny_data, tmp_path):
    ckpt, results = str(tmp_path / "opt_wanda_recon.pt"), str(tmp_path / "opt.json")
    res = prune.main(["--model", family_models["opt"]["student"], "--method", "wanda", "--reconstruct", "True",
                      "--recon_epochs", "2", "--calibration", calibrations["opt"], "--out", ckpt,
                      "--wikitext_dir", tiny_data["wikitext_dir"], "--ppl_windows", "2",
                      "--data_dir", tiny_data["data_dir"], "--eval_iters", "2", "--results", results,
                      "--device", "cpu"])
    on_disk = json.load(open(results))
    assert on_disk["family"] == "opt" and on_disk["nm_ok"] and on_disk["reconstruct"]["epochs"] == 2
    assert on_disk["reconstruct_seconds"] <= on_disk["prune_seconds"]
    assert len(on_disk["block_output_error"]) == 2 and on_disk["wikitext_ppl"] > 1 and on_disk["val_loss"] > 0
    from evaluate import main as evaluate_main
    ev = evaluate_main(["--model", ckpt, "--wikitext_dir", tiny_data["wikitext_dir"], "--ppl_windows", "2"])
    assert ev["wikitext_ppl"] == pytest.approx(res["wikitext_ppl"], rel=1e-5) and ev["nm_ok"]
    model = load_model(ckpt)
    trained = main_mod.main(["--config", "cpu_tiny", "--init_from", ckpt, "--data_dir", tiny_data["data_dir"],
                             "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(tmp_path / "run"),
                             "--max_iters", "2", "--eval_interval", "100", "--change_mask", "False"])
    assert trained["nm_ok"] and trained["iter"] == 2
    after = build_model(load_checkpoint(str(tmp_path / "run" / "ckpt.pt")))
    assert after.family == "opt"
    pairs = list(zip(sparse_layers(after), sparse_layers(model)))
    assert len(pairs) == 12 and all(torch.equal(a.mask, b.mask) for (_, a), (_, b) in pairs)
    assert any(not torch.equal(a.weight, b.weight) for (_, a), (_, b) in pairs)  # it did train


def own_tokenizer_data(student, data_root, out):
    """C4 train/val and WikiText-2 token files made with the model folder's own tokenizer."""
    from data.c4_dataset import prepare as c4_prepare
    from data.wikitext import prepare as wikitext_prepare

    c4 = os.path.join(data_root, "c4", "en")
    c4_prepare.main(["--input", os.path.join(c4, "c4-train.00000-of-01024.head1000.json.gz"), "--val_files",
                     os.path.join(c4, "c4-validation.00000-of-00008.head1000.json.gz"), "--max_docs", "50",
                     "--tokenizer", student, "--out_dir", str(out / "c4")])
    wikitext_prepare.main(["--input", os.path.join(data_root, "wikitext2"), "--tokenizer", student,
                           "--out_dir", str(out / "wikitext")])
    return {"data_dir": str(out / "c4"), "wikitext_dir": str(out / "wikitext")}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_cli_on_llama_layout_families_evaluates_and_exports_exactly_nm(family, family_models, calibrations,
                                                                       tiny_data, data_root, tmp_path):
    student, out = family_models[family]["student"], str(tmp_path / "hf")
    # transformers reads the GPT-2 files beside a qwen2 config as Qwen2's tokenizer (another pre-tokenizer):
    # the GPT-2 token files are refused for it, so it gets data made with its own tokenizer
    data = own_tokenizer_data(student, data_root, tmp_path) if family == "qwen2" else tiny_data
    res = prune.main(["--model", student, "--method", "sparsegpt", "--calibration", calibrations[family], "--out", out,
                      "--wikitext_dir", data["wikitext_dir"], "--ppl_windows", "2", "--data_dir", data["data_dir"],
                      "--eval_iters", "2", "--device", "cpu"])
    assert res["family"] == family and res["nm_ok"] and res["wikitext_ppl"] > 1 and res["val_loss"] > 0
    assert res["eval_block_size"] == 64  # the model's context: WikiText-2 windows of 64 tokens
    hf = load_hf(out)
    linears = [mod.weight for n, mod in hf.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"]
    assert len(linears) == 14 and all(((w != 0).reshape(-1, 4).sum(-1) <= 2).all() for w in linears)


def test_same_seed_same_bytes_and_the_seed_matters(family_models, calibrations, tmp_path):
    def run(seed, name):
        out = str(tmp_path / name)
        prune.main(["--model", family_models["llama"]["student"], "--method", "sparsegpt", "--reconstruct", "True",
                    "--recon_epochs", "2", "--recon_lr", "1e-3", "--seed", str(seed), "--batch_size", "2",
                    "--calibration", calibrations["llama"], "--out", out, "--wikitext_dir", "", "--device", "cpu"])
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            return f.read()

    first = run(0, "a")
    assert run(0, "b") == first
    assert run(1, "c") != first  # another order of the calibration batches: other weights


def test_family_cli_errors_come_before_any_pruning(family_models, calibrations, tmp_path):
    student, out = family_models["opt"]["student"], str(tmp_path / "never.pt")
    cases = [
        (["--method", "wanda", "--calibration", calibrations["opt"], "--wikitext_dir", str(tmp_path / "nowiki")],
         "not found"),
        (["--method", "magnitude", "--reconstruct", "True"], "needs --calibration"),
        (["--method", "wanda", "--calibration", calibrations["opt"], "--reconstruct", "True", "--recon_parts",
          "attn,ffn"], "--recon_parts"),
        (["--method", "wanda", "--calibration", calibrations["opt"], "--recon_epochs", "0"], "--recon_epochs"),
    ]
    for argv, match in cases:
        with pytest.raises(UserError, match=match) as e:
            prune.main(["--model", student, "--out", out, *argv])
        assert "\n" not in str(e.value)
        assert not os.path.exists(out)
