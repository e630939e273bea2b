"""sources.resolve, the one place that turns what a user passed as a model or tokenizer (a GPT-2 name, a path, a
.gguf file, a Hugging Face hub id) into where it is; and the prepare command that missing-data hints name."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import prune
from checkpoint import load_model
from cli import REPO_ROOT, UserError
from conftest import save_tiny_family, save_tiny_gpt2
from data.tokenizer import get_tokenizer, prepare_flag
from sources import Source, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_names_paths_and_gguf_files_resolve_to_where_they_are(tmp_path):
    assert resolve("gpt2-medium") == Source(os.path.join(REPO_ROOT, "gpt2-medium"))
    assert resolve(str(tmp_path)) == Source(str(tmp_path))
    assert resolve("out/missing.pt") == Source("out/missing.pt")  # no hub id: the loader says it is not found
    gguf = tmp_path / "Model.Q4_1.gguf"
    gguf.write_bytes(b"")
    source = resolve(str(gguf))
    assert source.gguf_file == "Model.Q4_1.gguf" and source.name == str(gguf)
    assert source.pretrained_args() == {"pretrained_model_name_or_path": str(tmp_path), "local_files_only": True,
                                        "gguf_file": "Model.Q4_1.gguf"}
    assert prepare_flag(str(gguf)) == f" --tokenizer {gguf}"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (what HF_HOME=... HF_HUB_OFFLINE=1 give a fresh process)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache, repo_id, folder):
    """Move a model folder's files into the cache as huggingface_hub lays a download out: the files as blobs named
    by their hash, the snapshot of a commit as links to them, refs/main naming that commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            blob = hashlib.sha256(f.read()).hexdigest()
        os.replace(os.path.join(folder, name), blobs / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return str(snapshot)


def test_a_cached_hub_id_loads_the_cached_model_with_its_tokenizer(hub_cache, data_root, tmp_path):
    import transformers

    save_tiny_family(str(tmp_path / "download"), "llama", data_root)
    snapshot = put_in_cache(hub_cache, "tiny-owner/tiny-llama", str(tmp_path / "download"))
    model = load_model("tiny-owner/tiny-llama")
    reference = transformers.AutoModelForCausalLM.from_pretrained(snapshot, local_files_only=True).eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(idx, targets=idx)[0], reference(idx).logits, atol=1e-5)
    tok = get_tokenizer("tiny-owner/tiny-llama")
    assert model.tokenizer_info == {"dir": "tiny-owner/tiny-llama", "fingerprint": tok.fingerprint}
    assert tok.encode_document("Hello world") == [15496, 995]  # the GPT-2 BPE saved beside it
    assert prepare_flag("tiny-owner/tiny-llama") == " --tokenizer tiny-owner/tiny-llama"


@pytest.mark.parametrize("script, flags", [
    ("evaluate.py", ["--model", "HuggingFaceTB/SmolLM2-135M", "--wikitext_dir", ""]),
    ("data/wikitext/prepare.py", ["--tokenizer", "HuggingFaceTB/SmolLM2-135M", "--out_dir", "OUT"]),
])
def test_a_hub_id_not_cached_offline_is_one_line_and_exit_code_2(script, flags, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_HUB_OFFLINE="1")
    flags = [str(tmp_path / "out") if f == "OUT" else f for f in flags]
    run = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *flags], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "HuggingFaceTB/SmolLM2-135M" in lines[0] and "not in the cache" in lines[0] and "hf download" in lines[0]
    assert not os.path.exists(tmp_path / "out")


def test_missing_data_hints_name_the_prepare_command_with_the_models_tokenizer(data_root, tmp_path):
    llama, gpt2 = str(tmp_path / "llama"), str(tmp_path / "gpt2")
    save_tiny_family(llama, "llama", data_root)
    save_tiny_gpt2(gpt2, n_layer=1, n_embd=32)
    assert prepare_flag(gpt2) == prepare_flag("scratch") == ""  # GPT-2's BPE: the prepare scripts' default
    assert prepare_flag(llama) == f" --tokenizer {llama}"
    missing = str(tmp_path / "no_wikitext")
    with pytest.raises(UserError, match=f"data/wikitext/prepare.py --out_dir {missing} --tokenizer {llama}`"):
        evaluate.main(["--model", llama, "--wikitext_dir", missing])
    with pytest.raises(UserError, match=rf"prepare_calibration_data.py --input C4_FILES --tokenizer {llama}`"):
        prune.parse_args(["--model", llama, "--method", "wanda"])
    with pytest.raises(UserError, match=r"prepare_calibration_data.py --input C4_FILES`"):
        prune.parse_args(["--model", gpt2, "--method", "wanda"])


def test_a_file_named_gguf_that_is_not_one_is_one_line_from_the_loader_and_the_tokenizer(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF, but not really" * 8)
    with pytest.raises(UserError, match=f"cannot load {bad} with transformers' GGUF loader"):
        load_model(str(bad))
    with pytest.raises(UserError, match=f"--tokenizer {bad}: transformers cannot load its tokenizer"):
        get_tokenizer(str(bad))
