"""scripts/gpu_check.sh's scaffolding on a CPU: the inputs it makes for itself (tokenizer, tiny GPT-2, token files)
with no shared data, and a main.py run on them with the flags the check uses (its CUDA parts need a GPU)."""
import json
import os
import subprocess
import sys

import pytest

import main as main_mod
from conftest import REPO_ROOT
from data.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "SPARSE_GPT2_DATA": str(out / "no_shared_data"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "gpu_check_inputs.py"), str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_gpu_check_makes_its_own_tokenizer_model_and_token_files(inputs):
    tok = get_tokenizer(str(inputs / "tiny_gpt2"))
    with open(inputs / "tiny_gpt2" / "config.json") as f:
        assert json.load(f)["vocab_size"] == tok.vocab_size > 256  # bytes plus learned merges
    text = "The council said on monday that"
    assert tok.decode(tok.encode_document(text)) == text  # a real BPE: encodes and decodes back
    for folder, split in (("c4", "train"), ("c4", "val"), ("wikitext", "test")):
        with open(inputs / folder / "meta.json") as f:
            meta = json.load(f)
        assert meta["tokenizer"]["loaded_from"] == str(inputs / "tiny_gpt2")
        assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
        assert os.path.getsize(inputs / folder / f"{split}.bin") > 2 * 64 * 2  # several windows of 64 uint16 ids


def test_main_runs_on_the_gpu_checks_inputs_with_its_flags(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_GPT2_DATA", str(inputs / "no_shared_data"))
    flags = (inputs / "run_flags").read_text().split()
    res = main_mod.main([*flags, "--device", "cpu", "--max_iters", "2", "--out_dir", str(tmp_path / "run")])
    assert res["iter"] == 2 and res["nm_ok"] and res["wikitext_ppl"] > 1
