"""Any decoder-only transformers model, found from the model itself: tiny random configs (hidden 32, 2 blocks,
the GPT-2 tokenizer beside each) of Llama with Llama-3 rope scaling, Qwen3, Gemma 3 (text), Phi-3 (fused qkv and
gate_up), OLMo 2, GPT-NeoX, Qwen3-MoE (experts sparse, router dense), and StableLM and Granite, which no code of
ours names. For each, one test: logits equal transformers' before sparsify; the sparse layers are exactly the
block linears written out below; Wanda and SparseGPT run block by block; the export of a pruned model reloads in
the same class, every block linear exactly N:M, with the same logits; a short AST-Boosted run with distillation
lowers the validation loss, scores one zero-shot task and exports; greedy sampling matches transformers'. Then
Granite's scaled head, what only mixture-of-experts models have, the one-line refusals and docs/families.md's
table."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import export
import families
import main as main_mod
import sample
from checkpoint import load_checkpoint, load_model
from cli import UserError
from conftest import gpt2_tokenizer
from data.loader import BinDataset
from prune import Reconstruction, prune_model
from sparsity import check_nm, nm_violations, sparse_layers, sparsify

COMMON = dict(vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)
LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
# model_type -> (config arguments, where transformers keeps the blocks, the sparse layers of one block written out
# by hand: what the discovery must find; a name ending in "_proj" under "experts" is a 3-D expert weight)
ARCHS = {
    "llama": (dict(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "model.layers", LLAMA_LINEARS),
    "qwen3": (dict(num_key_value_heads=2, head_dim=8), "model.layers", LLAMA_LINEARS),
    "gemma3_text": (dict(num_key_value_heads=2, head_dim=8, sliding_window=8), "model.layers", LLAMA_LINEARS),
    "phi3": (dict(num_key_value_heads=2), "model.layers",
             ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "olmo2": (dict(num_key_value_heads=2), "model.layers", LLAMA_LINEARS),
    "gpt_neox": (dict(), "gpt_neox.layers", ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                             "mlp.dense_4h_to_h"]),
    "qwen3_moe": (dict(num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16), "model.layers",
                  LLAMA_LINEARS[:4] + ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "stablelm": (dict(num_key_value_heads=4), "model.layers", LLAMA_LINEARS),
    "granite": (dict(num_key_value_heads=2, logits_scaling=4.0), "model.layers", LLAMA_LINEARS),
}
IDX = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(5))


def save_tiny(path, model_type, tokenizer, **overrides):
    import transformers

    args, _, _ = ARCHS[model_type]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **args, **overrides})
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def arch_folders(data_root, tmp_path_factory):
    """model_type -> a tiny random folder of it (built once for the session)."""
    root, tok = tmp_path_factory.mktemp("archs"), gpt2_tokenizer(data_root)
    return {arch: save_tiny(str(root / arch), arch, tok) for arch in ARCHS}


@pytest.fixture(scope="session")
def calibration(tiny_data):
    """Eight 32-token windows of the C4 train tokens (GPT-2 ids, as the models' tokenizer)."""
    train = BinDataset(os.path.join(tiny_data["data_dir"], "train.bin"), 32)
    return train.get_batch(np.arange(8) * 997)[0]


def transformers_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def logits(model, idx=IDX):
    return model.eval()(idx, targets=idx)[0]


def expected_names(arch):
    """The sparse layers of both blocks as transformers names them (no "hf." prefix)."""
    _, blocks, names = ARCHS[arch]
    return [f"{blocks}.{i}.{name}" for i in range(2) for name in names]


def transformers_weight(hf, name):
    """The weight of a sparse layer in a transformers model: a 3-D expert Parameter or a linear's weight."""
    return hf.get_parameter(name) if ".experts." in name else hf.get_submodule(name).weight


def our_weight(model, name):
    """The dense weight W of one of our sparse layers, by its transformers name."""
    return dict(sparse_layers(model))["hf." + name].weight


def dense_tensors(model):
    """Every parameter outside the sparse layers (embeddings, norms, head, routers), by name."""
    sparse = {name for name, _ in sparse_layers(model)}
    return {k: v.detach().clone() for k, v in model.named_parameters()
            if k.rpartition(".")[0] not in sparse}


AST_BOOSTED = ["--config", "cpu_tiny", "--distill_model", "True", "--hardness_squarehead", "0.5",
               "--srste_decay", "1e-2", "--increase_step", "2", "--mask_update_interval", "2",
               "--learning_rate", "3e-3", "--gradient_checkpointing", "True", "--eval_interval", "100",
               "--max_iters", "4", "--lr_decay_iters", "4", "--warmup_iters", "1",
               "--zeroshot_tasks", "arc_easy", "--zeroshot_limit", "4"]


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch != "granite"])  # Granite: its head below
def test_every_tool_on_the_architecture(arch, arch_folders, tiny_data, calibration, data_root, tmp_path):
    folder, tokenizer = arch_folders[arch], gpt2_tokenizer(data_root)
    hf = transformers_model(folder)
    model = load_model(folder)
    assert model.family == arch and type(model.hf) is type(hf)
    # logits before sparsify: transformers' own (Granite's logits_scaling folded into the features)
    assert (logits(model) - hf(IDX).logits).abs().max() <= 1e-5

    # the sparse layers: exactly the block linears (and expert weights); everything else dense
    swapped = sparsify(model, filter_fn=families.sparse_filter(model))
    assert swapped == ["hf." + name for name in expected_names(arch)]
    assert check_nm(model)[0]

    # Wanda and SparseGPT, block by block on captured block inputs
    for method in ("wanda", "sparsegpt"):
        pruned, report = load_model(folder), []
        dense = dense_tensors(pruned)
        before = {name: transformers_weight(pruned.hf, name).detach().clone() for name in expected_names(arch)}
        prune_model(pruned, method, tokens=calibration, batch_size=4, progress=False, report=report)
        assert [row["block"] for row in report] == [0, 1] and all(row["output_error"] > 0 for row in report)
        assert check_nm(pruned)[0]
        for k, v in dense_tensors(pruned).items():
            assert torch.equal(v, dense[k]), k
        for name, w in before.items():
            now = our_weight(pruned, name)
            kept = now != 0
            assert nm_violations(now, 2, 4) == 0 and kept.float().mean() == 0.5
            changed = not torch.equal(now[kept], w[kept])
            assert changed == (method == "sparsegpt"), name  # only SparseGPT updates the kept weights

    # local reconstruction after pruning: each block's attention and MLP (the whole MoE block) move toward the
    # dense submodules' outputs
    rebuilt, report = load_model(folder), []
    prune_model(rebuilt, "magnitude", tokens=calibration, batch_size=4, progress=False, report=report,
                reconstruct=Reconstruction(epochs=2, lr=1e-3))
    assert check_nm(rebuilt)[0] and all(row[part][1] < row[part][0] for row in report for part in ("attn", "mlp"))

    # the export of the (SparseGPT) pruned model: the same class, every block linear exactly 2:4, same logits
    out = str(tmp_path / "pruned_hf")
    export.export_model(pruned, out)
    again = transformers_model(out)
    assert type(again) is type(hf)
    for name in expected_names(arch):
        w = transformers_weight(again, name)
        assert nm_violations(w, 2, 4) == 0 and (w == 0).float().mean() == 0.5, name
    assert (again(IDX).logits - logits(pruned)).abs().max() <= 1e-5
    ours = load_model(out)  # our loader gives the export its sparse layers (expert weights too) back
    assert [name for name, _ in sparse_layers(ours)] == ["hf." + name for name in expected_names(arch)]
    assert check_nm(ours)[0] and (logits(ours) - logits(pruned)).abs().max() <= 1e-6
    # sampling from the export (greedy) continues the prompt as transformers' own greedy decoding does
    text = sample.main(["--model", out, "--start", "The", "--num_samples", "1", "--max_new_tokens", "4",
                        "--temperature", "0"])[0]
    ids = torch.tensor([tokenizer.encode("The")])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, again(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert text == tokenizer.decode(ids[0, 1:])

    # AST-Boosted (SR-STE, mask updates, distillation: CE + KL + SquareHead from the dense model, gradient
    # checkpointing; SLoRB where it applies) lowers the validation loss, scores a zero-shot task, exports
    run = tmp_path / "run"
    slorb = ["--SLoRB", "True", "--trainable_projection", "True"] if arch != "qwen3_moe" else []
    res = main_mod.main([*AST_BOOSTED, *slorb, "--student_model", folder, "--teacher_model", folder,
                         "--data_dir", tiny_data["data_dir"], "--wikitext_dir", tiny_data["wikitext_dir"],
                         "--out_dir", str(run)])
    assert res["nm_ok"] and res["family"] == arch and res["iter"] == 4
    val = [json.loads(line)["val_loss"] for line in open(run / "metrics.jsonl") if "val_loss" in line]
    assert len(val) >= 2 and val[-1] < val[0]
    acc = res["zeroshot"]["tasks"]["arc_easy"]
    assert acc["n"] == 4 and 0 <= acc["acc"] <= 1
    if arch == "qwen3_moe":  # exact resume of expert weights, masks and their optimizer state (linears: test_families)
        split = [*AST_BOOSTED, "--student_model", folder, "--teacher_model", folder, "--data_dir",
                 tiny_data["data_dir"], "--wikitext_dir", tiny_data["wikitext_dir"],
                 "--out_dir", str(tmp_path / "split")]
        assert main_mod.main([*split, "--max_iters", "2", "--zeroshot_tasks", ""])["iter"] == 2
        assert main_mod.main([*split, "--init_from", "resume", "--zeroshot_tasks", ""])["iter"] == 4
        a, b = (load_checkpoint(str(d / "ckpt.pt"))["model"] for d in (run, tmp_path / "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = export.main(["--checkpoint", str(run / "ckpt.pt"), "--out", str(tmp_path / "ast_hf")])
    assert info["verify"]["ok"] and info["verify"]["transformers_class"] == type(hf).__name__
    assert info["sparse_layers"] == expected_names(arch)


def test_a_head_that_scales_the_logits_gives_transformers_logits_loss_and_export(arch_folders, tmp_path):
    # Granite divides the logits by logits_scaling (4 here) after lm_head: the fused loss must see the same logits
    folder = arch_folders["granite"]
    hf, model = transformers_model(folder), load_model(folder).eval()
    y = torch.roll(IDX, -1, 1)
    with torch.no_grad():
        ref = hf(IDX).logits
        got, loss = model(IDX, targets=y)
    assert (got - ref).abs().max() <= 1e-5
    assert loss.item() == pytest.approx(F.cross_entropy(ref.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    sparsify(model, filter_fn=families.sparse_filter(model))
    info = export.export_model(model, str(tmp_path / "hf"))
    assert export.verify_export(model, str(tmp_path / "hf"), info)["ok"]


# --------------------------------------------------------------------------------------------- mixture of experts
def test_wanda_statistics_of_each_expert_come_from_the_tokens_routed_to_it(arch_folders, calibration):
    model = load_model(arch_folders["qwen3_moe"])
    moe = model.blocks[0].mlp
    seen = []
    handle = moe.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, 32)))

    def calibrate(m):
        m(calibration)
    sparsify(model, metric="wanda", filter_fn=families.sparse_filter(model), calibrate=calibrate)
    handle.remove()
    # independently: route the MoE block's inputs with its own router, sum x² over each expert's tokens
    x = torch.cat(seen)
    with torch.no_grad():
        top = moe.gate(x)[2]  # (tokens, top_k) expert indices
    layer = moe.experts.gate_up_proj
    assert layer.input_sq.shape == (4, 32)
    for e in range(4):
        mine = x[(top == e).any(-1)]
        torch.testing.assert_close(layer.input_sq[e], mine.pow(2).sum(0), rtol=1e-5, atol=1e-6)
    # the masks come from those statistics: |W| · ||X_j|| of each expert's own inputs, 2:4 along `in`
    w = layer.weight.detach()
    scores = w.abs() * layer.input_sq.sqrt().unsqueeze(1)
    kept = torch.zeros_like(layer.mask).scatter_(-1, scores.view(4, 32, 8, 4).topk(2, -1).indices.view(4, 32, 16)
                                                 + torch.arange(0, 32, 4).repeat_interleave(2), True)
    assert torch.equal(layer.mask, kept)
    # the router stays dense; the experts' own forward runs on W ⊙ M: expert 1 alone, computed by hand
    assert [name for name, _ in sparse_layers(moe)] == ["experts.gate_up_proj", "experts.down_proj"]
    down = moe.experts.down_proj
    with torch.no_grad():
        got = moe.experts(x[:3], torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1))
        gate, up = F.linear(x[:3], (w * layer.mask)[1]).chunk(2, -1)
        want = F.linear(F.silu(gate) * up, (down.weight * down.mask)[1])
    torch.testing.assert_close(got, want)


def test_slorb_on_expert_weights_is_refused_in_one_line(arch_folders, tiny_data, tmp_path):
    args = ["--config", "cpu_tiny", "--student_model", arch_folders["qwen3_moe"], "--data_dir", tiny_data["data_dir"],
            "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(tmp_path / "run"), "--SLoRB", "True"]
    with pytest.raises(UserError, match=r"^hf\.model\.layers\.0\.mlp\.experts\.gate_up_proj: SLoRB does not apply "
                                        r"to mixture-of-experts weights: use --SLoRB False") as e:
        main_mod.main(args)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- refusals
def test_a_model_without_a_block_list_is_refused_in_one_line(arch_folders):
    hf = transformers_model(arch_folders["llama"])
    hf.model.layers = torch.nn.Sequential(*hf.model.layers)  # the blocks, but in no ModuleList
    with pytest.raises(UserError, match=r"^LlamaForCausalLM \(llama\) has no recognisable decoder block list "
                                        r"\(an nn.ModuleList of num_hidden_layers = 2 blocks") as e:
        families.HFCausalLM(hf)
    assert "\n" not in str(e.value)


def test_a_model_type_transformers_does_not_know_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(UserError, match=r"^cannot load .* with transformers \(.*no_such_model") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_block_linears_that_cannot_be_grouped_name_the_layer_and_the_input_dimension(arch_folders, calibration):
    model = load_model(arch_folders["phi3"])
    with pytest.raises(ValueError, match=r"^hf\.model\.layers\.0\.self_attn\.o_proj: input dimension 32 is not "
                                         r"divisible by M=6"):
        sparsify(model, n=2, m=6, filter_fn=families.sparse_filter(model))



# ---------------------------------------------------------------------------------------- docs/families.md's table
# Where each architecture was checked: every one on tiny random weights here. The real-model issue flips an
# entry to name the pretrained model it checks (SmolLM2 for the LLaMA layout).
CHECKED_ON = {arch: "random tiny only" for arch in ["gpt2", "opt", "mistral", "qwen2", *ARCHS]}
CHECKED_ON["llama"] = "random tiny, and the pretrained SmolLM2-135M (`tests/test_real_model.py`)"


def block_layout(model):
    """The sparse layers of block 0 relative to it, grouped by parent: "`self_attn.{q_proj,k_proj}`, `fc1`"."""
    blocks = next(name for name, module in model.named_modules() if module is model.blocks)
    groups = {}
    for name, layer in sparse_layers(model):
        if name.startswith(f"{blocks}.0."):
            parent, _, leaf = name[len(blocks) + 3:].rpartition(".")
            groups.setdefault((parent, layer.weight.dim() == 3), []).append(leaf)
    cells = []
    for (parent, experts), leaves in groups.items():
        if not parent:
            cells += [f"`{leaf}`" for leaf in leaves]
            continue
        cells.append(f"`{parent}.{{{','.join(leaves)}}}`" if len(leaves) > 1 else f"`{parent}.{leaves[0]}`")
        cells[-1] += " (3-D: [experts, out, in])" if experts else ""
    return ", ".join(cells)


def family_table(folders):
    from transformers import AutoConfig, AutoModelForCausalLM

    from model import GPT, GPTConfig

    rows = ["| `model_type` | runs as | made sparse in every block (found in the model) | checked on |",
            "|---|---|---|---|"]
    for arch, folder in folders.items():
        with torch.device("meta"):  # the layout only: no weights are read or initialised
            model = GPT(GPTConfig(n_layer=2)) if arch == "gpt2" else \
                families.HFCausalLM(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)))
            sparsify(model, filter_fn=families.sparse_filter(model), init_masks=False)
        runs_as = "`model.GPT` (nanoGPT)" if arch == "gpt2" else f"`{type(model.hf).__name__}` itself"
        rows.append(f"| `{arch}` | {runs_as} | {block_layout(model)} | {CHECKED_ON[arch]} |")
    return "\n".join(rows)


def test_docs_family_table_is_what_the_code_finds(arch_folders, family_models, tiny_models):
    folders = {"gpt2": tiny_models["student"], "opt": family_models["opt"]["student"], "llama": arch_folders["llama"],
               **{f: family_models[f]["student"] for f in ("mistral", "qwen2")}, **arch_folders}
    want = family_table(folders)
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "families.md")).read()
    start = page.index("| `model_type` | runs as | made sparse")
    got = page[start:page.index("\n\n", start)]
    assert got == want, "docs/families.md's family table should read:\n" + want


def hf_model(model_type, **overrides):
    """An in-memory tiny transformers model (no folder): for what only needs the module tree."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, "num_key_value_heads": 2, "vocab_size": 256,
                                                           **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_shared_experts_are_sparse_and_their_one_output_gate_and_the_router_dense():
    model = families.HFCausalLM(hf_model("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=32))
    swapped = sparsify(model, filter_fn=families.sparse_filter(model))
    mlp = [name[len("hf.model.layers.0.mlp."):] for name in swapped if name.startswith("hf.model.layers.0.mlp.")]
    assert mlp == ["experts.gate_up_proj", "experts.down_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                   "shared_expert.down_proj"]
    assert type(model.blocks[0].mlp.shared_expert_gate) is torch.nn.Linear  # (hidden -> 1), dense


@pytest.mark.parametrize("model_type,overrides,message", [
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                     layer_types=["sliding_attention", "full_attention"]),
     r"^hf\.model\.layers\.0\.mlp\.experts\.gate_up_proj: the experts are stored \[experts, in, out\] "
     r"\(is_transposed\) and N:M groups run along the input dimension"),
    ("gemma2", dict(head_dim=8), r"^gemma2: final_logit_softcapping = 30\.0 caps the logits after lm_head"),
])
def test_layouts_the_sparse_machinery_cannot_serve_are_refused_in_one_line(model_type, overrides, message):
    with pytest.raises((UserError, ValueError), match=message) as e:
        model = families.HFCausalLM(hf_model(model_type, **overrides))
        sparsify(model, filter_fn=families.sparse_filter(model))
    assert "\n" not in str(e.value)
