"""Model families through one loader: OPT and LLaMA end to end, GPT-2 through the same paths, Mistral and Qwen2
smoke tests; tiny random folders saved with save_pretrained, the GPT-2 tokenizer beside each."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import export
import families
import main as main_mod
from checkpoint import build_model, load_checkpoint, load_model, model_state, save_checkpoint
from cli import UserError
from conftest import REPO_ROOT, gpt2_tokenizer, save_tiny_family
from data.loader import BinDataset, check_tokenizer, load_wikitext_tokens, read_meta
from distill import Distiller, load_teacher, squarehead_loss
from evaluate import wikitext_perplexity
from sparsity import SparseLinear, check_nm, nm_violations, sparse_layers, sparsify

ALL = ["gpt2", "opt", "llama", "mistral", "qwen2"]
# The block linears each family must make sparse, written out here independently of families.SPARSE_LINEARS.
TARGETS = {
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "opt": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
}
TARGETS["mistral"] = TARGETS["qwen2"] = TARGETS["llama"]
BLOCKS = {"gpt2": "transformer.h", "opt": "hf.model.decoder.layers", "llama": "hf.model.layers",
          "mistral": "hf.model.layers", "qwen2": "hf.model.layers"}
IDX = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def folders(family_models, tiny_models, data_root, tmp_path_factory):
    """family -> {student, teacher}: the family_models folders, a GPT-2 pair with the tokenizer copied in, and an
    OPT-350m-shaped student (word embeddings narrower than the blocks: project_in/out; post-norm blocks)."""
    out = dict(family_models)
    root = tmp_path_factory.mktemp("gpt2_tok")
    out["gpt2"] = {}
    for role in ("student", "teacher"):
        path = str(root / role)
        shutil.copytree(tiny_models[role], path)
        gpt2_tokenizer(data_root).save_pretrained(path)
        out["gpt2"][role] = path
    out["opt350"] = {"student": str(root / "opt350")}
    save_tiny_family(out["opt350"]["student"], "opt", data_root, word_embed_proj_dim=16, do_layer_norm_before=False)
    return out


def transformers_logits(folder, idx):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(idx).logits


def ours_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx, targets=idx)[0]


def sparse_names(model, family):
    n_layer = model.config.n_layer
    return {f"{BLOCKS[family]}.{i}.{name}" for i in range(n_layer) for name in TARGETS[family]}


# --------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", ALL + ["opt350"])
def test_loaded_model_gives_the_logits_of_transformers(family, folders):
    folder = folders[family]["student"]
    model = load_model(folder)
    assert model.family == ("opt" if family == "opt350" else family)
    assert (ours_logits(model, IDX) - transformers_logits(folder, IDX)).abs().max() <= 1e-5
    assert model.tokenizer_info["dir"] == os.path.abspath(folder)


@pytest.mark.parametrize("family", ["opt", "llama", "opt350"])
def test_block_outputs_for_squarehead_are_the_transformers_hidden_states(family, folders):
    from transformers import AutoModelForCausalLM

    folder = folders[family]["student"]
    model = load_model(folder).eval()
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        feats, hidden = model.features(IDX, return_hidden=True)
        ref = hf(IDX, output_hidden_states=True).hidden_states  # embeddings, blocks 0..L-2, final (normed)
        assert len(hidden) == model.config.n_layer
        for i in range(len(hidden) - 1):
            torch.testing.assert_close(hidden[i], ref[i + 1], rtol=0, atol=0)
        torch.testing.assert_close(feats, ref[-1], rtol=0, atol=0)
        if family == "opt350":  # no final norm after post-norm blocks; project_out maps to the head's width
            last = hf.model.decoder.project_out(hidden[-1])
        else:
            last = (hf.model.norm if family == "llama" else hf.model.decoder.final_layer_norm)(hidden[-1])
        torch.testing.assert_close(last, ref[-1], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- sparsify
@pytest.mark.parametrize("family", ALL)
def test_sparsify_makes_exactly_the_block_linears_nm_and_leaves_everything_else(family, folders):
    model = load_model(folders[family]["student"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = sparsify(model, filter_fn=families.sparse_filter(model))
    assert set(swapped) == sparse_names(model, family)
    ok, rows = check_nm(model)
    assert ok and len(rows) == len(swapped)
    for name, layer in sparse_layers(model):
        w = layer.weight * layer.mask
        assert nm_violations(w, 2, 4) == 0 and (w == 0).float().mean() == 0.5
    after = model.state_dict()
    for key, value in before.items():  # weights are masked in the forward, never changed in place
        assert torch.equal(after[key], value), key
    dense = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, SparseLinear)]
    assert all(not any(t in n for t in TARGETS[family]) for n in dense)  # head, OPT's projections stay dense
    assert not isinstance(model.lm_head, SparseLinear)


def test_squarehead_and_kl_distillation_on_a_llama_student(folders, data_root, tmp_path):
    # a teacher of the student's shape (SquareHead needs it), other weights
    path = str(tmp_path / "same_shape")
    save_tiny_family(path, "llama", data_root, seed=7)
    student, teacher = load_model(folders["llama"]["student"]), load_teacher(path)
    d = Distiller(teacher, student.config, hardness_task=0.3, hardness_kldiv=0.5, hardness_squarehead=0.7,
                  temperature=2.0, chunk_size=5)
    y = torch.roll(IDX, -1, 1)
    loss, parts = d(student, IDX, y)
    logits, ce, hidden = student(IDX, y, return_hidden=True)
    t_logits, t_hidden = transformers_logits(path, IDX), teacher(IDX, features_only=True, return_hidden=True)[1]
    p_t = F.softmax(t_logits / 2.0, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / 2.0, -1))).sum(-1).mean() * 4.0
    sq = sum(((a - b) ** 2).mean() / ((b ** 2).mean() + 1e-6) for a, b in zip(hidden, t_hidden))
    assert len(hidden) == 2 and parts["squarehead"].item() > 0
    for got, want in ((parts["ce"], ce), (parts["kl"], kl), (parts["squarehead"], sq)):
        assert abs(got.item() - want.item()) <= 1e-5
    assert abs(loss.item() - (0.3 * ce + 0.5 * kl + 0.7 * sq).item()) <= 1e-5
    assert squarehead_loss(hidden, hidden).item() == 0.0


# --------------------------------------------------------------------------------------------- training
AST_BOOSTED = ["--distill_model", "True", "--SLoRB", "True", "--trainable_projection", "True",
               "--srste_decay", "1e-2", "--increase_step", "2", "--mask_update_interval", "2",
               "--learning_rate", "3e-3", "--gradient_checkpointing", "True", "--eval_interval", "100",
               "--max_iters", "4", "--lr_decay_iters", "4", "--warmup_iters", "1"]


def run_args(folders, family, tiny_data, out_dir, *extra):
    return ["--config", "cpu_tiny", "--student_model", folders[family]["student"],
            "--teacher_model", folders[family]["teacher"], "--data_dir", tiny_data["data_dir"],
            "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(out_dir), *AST_BOOSTED, *extra]


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("family,metric", [("opt", "magnitude"), ("llama", "wanda")])
def test_ast_boosted_trains_the_same_on_one_and_two_ranks_and_resumes_exactly(family, metric, folders, tiny_data,
                                                                               tmp_path):
    from test_main import torchrun

    args = lambda name, *more: run_args(folders, family, tiny_data, tmp_path / name, "--mask_metric", metric, *more)  # noqa: E731
    one = main_mod.main(args("one"))
    assert one["nm_ok"] and one["family"] == family and one["slorb_k"] == 16 and one["pattern"] == "2:4"
    l1 = losses(tmp_path / "one")
    val = [json.loads(line)["val_loss"] for line in open(tmp_path / "one" / "metrics.jsonl") if "val_loss" in line]
    assert sorted(l1) == [1, 2, 3, 4] and val[-1] < val[0]  # distillation from a larger teacher, SR-STE, SLoRB
    proc = torchrun(args("two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "results.json"))
    assert two["world_size"] == 2 and two["masks_identical_across_ranks"]
    for it, loss in losses(tmp_path / "two").items():
        assert loss == pytest.approx(l1[it], rel=1e-5, abs=1e-5), it
    main_mod.main(args("split", "--max_iters", "2"))
    main_mod.main(args("split", "--init_from", "resume"))
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("one", "split"))
    assert a["family"] == family and a["model_args"]["model_type"] == family
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["model"]:  # and the 2-rank run ends with the same masks
        if key.endswith("mask"):
            assert torch.equal(a["model"][key], load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["model"][key])


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_two_training_steps_on_data_made_with_the_models_own_tokenizer(family, folders, data_root, tmp_path):
    # transformers loads the GPT-2 files beside a qwen2 config as Qwen2Tokenizer, which splits digits: other ids
    # than tiktoken's, so this model needs its own token files (and the loader insists on them)
    from data.c4_dataset import prepare as c4_prepare
    from data.wikitext import prepare as wikitext_prepare

    tok = folders[family]["student"]
    c4 = os.path.join(data_root, "c4", "en")
    c4_prepare.main(["--input", os.path.join(c4, "c4-train.00000-of-01024.head1000.json.gz"), "--val_files",
                     os.path.join(c4, "c4-validation.00000-of-00008.head1000.json.gz"), "--max_docs", "30",
                     "--out_dir", str(tmp_path / "c4"), "--tokenizer", tok, "--num_proc", "1"])
    wikitext_prepare.main(["--input", os.path.join(data_root, "wikitext2"), "--out_dir", str(tmp_path / "wt"),
                           "--tokenizer", tok])
    data = {"data_dir": str(tmp_path / "c4"), "wikitext_dir": str(tmp_path / "wt")}
    res = main_mod.main(run_args(folders, family, data, tmp_path / "run", "--max_iters", "2", "--SLoRB", "False",
                                 "--gradient_checkpointing", "False"))
    assert res["iter"] == 2 and res["nm_ok"] and res["family"] == family


# --------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", ALL)
def test_export_reloads_in_transformers_with_the_same_logits_exactly_nm(family, folders, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_model(folders[family]["student"])
    sparsify(model, filter_fn=families.sparse_filter(model), slorb_k=16, trainable_projection=True)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.slorb_S.add_(0.05)  # a non-trivial SLoRB branch
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(model_state(model), ckpt)
    ours = build_model(load_checkpoint(ckpt)).eval()
    for merge in (False, True):
        out = str(tmp_path / f"hf_{merge}")
        res = export.main(["--checkpoint", ckpt, "--out", out, "--merge_slorb", str(merge)])
        assert res["verify"]["ok"] and res["family"] == family
        hf = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers, the family's own class
        assert hf.config.model_type == family
        for name in res["sparse_layers"]:
            assert nm_violations(families.transformers_weight(hf, name), 2, 4) == 0
        again = load_model(out)  # the one loader restores masks and the separate SLoRB branch
        assert torch.equal(ours_logits(again, IDX), ours_logits(ours, IDX)) if not merge else \
            (ours_logits(again, IDX) - ours_logits(ours, IDX)).abs().max() <= 1e-5
        if merge:
            assert (hf(IDX).logits - ours_logits(ours, IDX)).abs().max() <= 1e-5
        else:
            assert len(res["sparse_layers"]) == len(sparse_names(model, family))
            assert all(layer.slorb_S is not None for _, layer in sparse_layers(again))
        assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))  # the model's own tokenizer, copied


def test_a_sparse_export_or_checkpoint_is_kept_exactly_and_contradicting_flags_stop(folders, tiny_data, tmp_path):
    model = load_model(folders["opt"]["student"])
    sparsify(model, n=4, m=8, filter_fn=families.sparse_filter(model), slorb_k=16)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.slorb_S.normal_(std=0.05)
    export.export_model(model, str(tmp_path / "exp"))
    save_checkpoint(model_state(model), str(tmp_path / "ckpt.pt"))
    base = ["--config", "cpu_tiny", "--data_dir", tiny_data["data_dir"], "--wikitext_dir", tiny_data["wikitext_dir"],
            "--eval_only", "True", "--ppl_windows", "2"]
    tokens = load_wikitext_tokens(tiny_data["wikitext_dir"])
    want = wikitext_perplexity(model.eval(), tokens, model.config.block_size, 2)  # main.py: the context
    for how in (["--student_model", str(tmp_path / "exp")], ["--init_from", str(tmp_path / "ckpt.pt")]):
        res = main_mod.main(base + how + ["--out_dir", str(tmp_path / how[0][2:])])
        assert res["pattern"] == "4:8" and res["slorb_k"] == 16 and res["config"]["N"] == 4  # the config follows
        assert res["wikitext_ppl"] == pytest.approx(want, rel=1e-6)  # masks and SLoRB exactly
    for flags, named in ((["--N", "2"], "--N 2 contradicts .* N = 4"), (["--SLoRB_k", "8"], "SLoRB_k = 16"),
                         (["--mode", "dense"], "--mode dense contradicts")):
        proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "main.py"), *base, "--init_from",
                               str(tmp_path / "ckpt.pt"), "--out_dir", str(tmp_path / "x"), *flags],
                              capture_output=True, text=True, cwd=REPO_ROOT)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and re.search(named, lines[0]), proc.stderr


# --------------------------------------------------------------------------------------------- data, evaluation
def test_wikitext_perplexity_equals_an_independent_transformers_computation(folders, tiny_data):
    tokens = load_wikitext_tokens(tiny_data["wikitext_dir"])
    for family in ("opt", "llama"):
        folder = folders[family]["student"]
        got = wikitext_perplexity(load_model(folder), tokens, 32, 3, batch_size=2)
        windows = tokens[:3 * 32].reshape(3, 32)
        logits = transformers_logits(folder, windows)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
        assert got == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def write_c4(path, texts):
    path.write_text("".join(json.dumps({"text": t, "timestamp": "", "url": ""}) + "\n" for t in texts))
    return str(path)


def test_data_prepared_with_a_models_tokenizer_round_trips_in_uint32_and_refuses_other_models(data_root, folders,
                                                                                              tiny_data, tmp_path):
    from data.c4_dataset import prepare as c4_prepare
    from data.wikitext import prepare as wikitext_prepare

    tok = gpt2_tokenizer(data_root)
    tok.add_tokens([f"<x{i}>" for i in range(15_300)])  # 65,557 ids: beyond uint16
    tok.add_special_tokens({"bos_token": "<x0>"})
    tok.add_bos_token = True  # like OPT and LLaMA: one BOS at the start of a tokenised text
    big = str(tmp_path / "big_tok")
    tok.save_pretrained(big)
    texts = ["Hello world <x15299> and <x70> again.", "A second document, plain.", "Third <x15000>."]
    c4 = write_c4(tmp_path / "docs.jsonl", texts * 4)
    out = str(tmp_path / "c4")
    c4_prepare.main(["--input", c4, "--val_files", write_c4(tmp_path / "val.jsonl", texts), "--out_dir", out,
                     "--tokenizer", big, "--num_proc", "1"])
    meta = read_meta(out)
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["vocab_size"] == len(tok) == 65_557
    want = [i for t in texts * 4 for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert max(want) >= 2 ** 16
    data = BinDataset(os.path.join(out, "train.bin"), 8)
    assert len(data) == len(want)
    x, y = data.get_batch(np.array([0, 5]))
    assert x[0].tolist() == want[:8] and y[1].tolist() == want[6:14]
    # WikiText by the Wanda/SparseGPT protocol: the tokenizer on the joined rows, BOS once at the start
    wt = str(tmp_path / "wt")
    wikitext_prepare.main(["--input", os.path.join(data_root, "wikitext2", "wiki.test.raw"), "--out_dir", wt,
                           "--tokenizer", big])
    tokens = load_wikitext_tokens(wt)
    rows = [line if line.strip() else "" for line in open(os.path.join(data_root, "wikitext2", "wiki.test.raw"),
                                                          encoding="utf-8")]
    assert tokens.tolist() == tok("\n\n".join(rows))["input_ids"] and tokens[0] == tok.bos_token_id
    assert (tokens == tok.bos_token_id).sum() == 1
    # a model of the GPT-2 tokenizer refuses these files (larger vocabulary), ...
    gpt2_model = load_model(folders["llama"]["student"])
    with pytest.raises(UserError, match="65,557 ids.*vocabulary of 50,257"):
        data.check_model(gpt2_model)
    # ... and a model whose vocabulary is large enough but whose tokenizer differs refuses the GPT-2 files
    other = str(tmp_path / "other_model")
    save_tiny_family(other, "llama", tokenizer=tok, vocab_size=65_600)
    with pytest.raises(UserError, match="tiktoken gpt2, not with the model's tokenizer"):
        check_tokenizer(read_meta(tiny_data["data_dir"]), load_model(other), "train.bin")
