"""export.py (GPT-2 here; OPT and LLaMA in test_families.py): checkpoints to Hugging Face folders; N:M and logits
survive the round trip."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import export
import prune
from checkpoint import build_model, load_checkpoint, load_model, model_state, save_checkpoint
from cli import UserError
from conftest import REPO_ROOT
from model import GPT
from sparsity import check_nm, nm_violations, sparse_layers, sparsify

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def student(tiny_models, data_root, tmp_path_factory):
    """The tiny student folder with the GPT-2 tokenizer beside it, as a real gpt2/ folder would have."""
    path = str(tmp_path_factory.mktemp("student_tok"))
    shutil.copytree(tiny_models["student"], path, dirs_exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(data_root, "gpt2_tokenizer", "hf", f), os.path.join(path, f))
    return path


def sparse_checkpoint(path, student_dir, slorb_k=0, trainable=False):
    """A 2:4 checkpoint as main.py writes it (config records the student folder); SLoRB S made non-trivial."""
    model = GPT.from_pretrained(student_dir)
    sparsify(model, slorb_k=slorb_k, trainable_projection=trainable)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            if layer.slorb_S is not None:
                layer.slorb_S.add_(0.05 * torch.randn(layer.slorb_S.shape, generator=gen))
            if isinstance(layer.slorb_X, torch.nn.Parameter):
                layer.slorb_X.add_(0.05 * torch.randn(layer.slorb_X.shape, generator=gen))
    save_checkpoint({**model_state(model), "config": {"student_model": student_dir, "init_from": ""}}, path)
    return build_model(load_checkpoint(path)).eval()


def logits(model, idx):
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(idx, targets=idx)[0]
        return model(idx).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def hf_violations(hf, n=2, m=4):
    return sum(nm_violations(blk.get_submodule(name).weight.t(), n, m)  # Conv1D is (in, out)
               for blk in hf.transformer.h for name in BLOCK_LINEARS)


IDX = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))


def test_export_loads_in_transformers_with_the_same_logits_and_exact_nm(student, tiny_data, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ckpt, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")
    ours = sparse_checkpoint(ckpt, student)
    res = export.main(["--checkpoint", ckpt, "--out", out, "--verify_ppl_windows", "2",
                       "--wikitext_dir", tiny_data["wikitext_dir"]])
    assert res["verify"]["ok"] and res["verify"]["nm_violations"] == 0
    assert res["verify"]["ppl_rel_diff"] <= 1e-4
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "sparse_export.json",
                                       "vocab.json"]
    hf = GPT2LMHeadModel.from_pretrained(out).eval()  # stock transformers, no custom code
    assert hf.transformer.h[0].mlp.c_fc.weight.shape == (64, 256)  # Conv1D layout (in, out)
    assert hf_violations(hf) == 0
    assert all((blk.get_submodule(n).weight == 0).float().mean() == 0.5 for blk in hf.transformer.h
               for n in BLOCK_LINEARS)
    assert rel(logits(hf, IDX), logits(ours, IDX)) <= 1e-4
    # the tokenizer came from the student folder the checkpoint records
    assert json.load(open(os.path.join(out, "sparse_export.json")))["tokenizer"] == student
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == [15496, 995]
    # our own loader restores the masks: evaluate.py reports N:M for the folder
    again = load_model(out)
    assert check_nm(again)[0] and torch.equal(logits(again, IDX), logits(ours, IDX))


def test_tokenizer_comes_from_tokenizer_dir_then_the_checkpoint_then_the_shared_data(student, data_root, tmp_path):
    model = build_model(load_checkpoint(_ckpt(tmp_path, student)))
    openai_layout = os.path.join(data_root, "gpt2_tokenizer")  # encoder.json + vocab.bpe: renamed on copy
    info = export.export_model(model, str(tmp_path / "a"), [openai_layout, student])
    assert info["tokenizer"] == openai_layout
    assert open(tmp_path / "a" / "merges.txt").read() == open(os.path.join(student, "merges.txt")).read()
    info = export.export_model(model, str(tmp_path / "b"), ["", str(tmp_path / "nowhere")])
    assert info["tokenizer"] == os.path.join(data_root, "gpt2_tokenizer", "hf")
    assert os.path.isfile(tmp_path / "b" / "vocab.json")


def _ckpt(tmp_path, student, **kw):
    path = str(tmp_path / "ckpt.pt")
    sparse_checkpoint(path, student, **kw)
    return path


@pytest.mark.parametrize("trainable", [True, False], ids=["learned_X", "indicator_X"])
def test_slorb_export_keeps_the_branch_separate_and_reloads_with_identical_logits(trainable, student, tmp_path,
                                                                                  capsys):
    from transformers import GPT2LMHeadModel

    ckpt, out = _ckpt(tmp_path, student, slorb_k=16, trainable=trainable), str(tmp_path / "hf")
    ours = build_model(load_checkpoint(ckpt)).eval()
    res = export.main(["--checkpoint", ckpt, "--out", out])
    assert "kept as a separate branch" in capsys.readouterr().err
    assert res["slorb"] == "separate" and res["verify"]["ok"] and res["verify"]["nm_ok"]
    assert os.path.isfile(os.path.join(out, "slorb.safetensors"))
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf_violations(hf) == 0  # the 2:4 part is exactly 2:4 ...
    assert rel(logits(hf, IDX), logits(ours, IDX)) > 1e-3  # ... and alone it is not the model
    for again in (load_model(out),):  # the one loader (evaluate.py, main.py, prune.py)
        again.eval()
        assert torch.equal(logits(again, IDX), logits(ours, IDX))
        assert check_nm(again)[0]
        assert all(layer.slorb_S is not None for _, layer in sparse_layers(again))


def test_merge_slorb_is_dense_equivalent_and_says_it_is_not_nm(student, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    ckpt, out = _ckpt(tmp_path, student, slorb_k=16, trainable=True), str(tmp_path / "merged")
    ours = build_model(load_checkpoint(ckpt)).eval()
    res = export.main(["--checkpoint", ckpt, "--out", out, "--merge_slorb", "True"])
    assert "NOT N:M" in capsys.readouterr().err
    assert res["slorb"] == "merged" and not res["nm_exact"] and res["verify"]["ok"]
    assert not os.path.exists(os.path.join(out, "slorb.safetensors"))
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert rel(logits(hf, IDX), logits(ours, IDX)) <= 1e-4
    assert hf_violations(hf) > 0  # W ⊙ M + S X is dense
    assert not sparse_layers(load_model(out))  # and our loader does not pretend otherwise


def test_unstructured_export_restores_masks_from_the_zeros(tiny_models, tmp_path):
    model = prune.prune_model(GPT.from_pretrained(tiny_models["student"]), "magnitude", sparsity=0.6,
                              progress=False).eval()
    export.export_model(model, str(tmp_path / "u"))
    again = load_model(str(tmp_path / "u")).eval()
    assert torch.equal(logits(again, IDX), logits(model, IDX))
    for (_, a), (_, b) in zip(sparse_layers(again), sparse_layers(model)):
        assert a.mask_type == "unstructured_layer" and torch.equal(a.mask, b.mask)


def test_export_errors_are_one_line_with_exit_code_2(student, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "export.py"), "--checkpoint",
                           str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "not found" in lines[0], proc.stderr
    ckpt = _ckpt(tmp_path, student)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        export.main(["--checkpoint", ckpt, "--out", str(tmp_path / "full")])
