"""What a real model's long runs need: progress lines off a terminal, evaluation windows apart from the
calibration length, masks stored as bits, throughput and flip lines that say what they measure."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import main as main_mod
import prune
from checkpoint import load_checkpoint, load_model, pack_masks, unpack_masks
from conftest import REPO_ROOT
from evaluate import main as evaluate_main
from sparsity import sparse_layers


@pytest.fixture(scope="module")
def calibration(data_root, tmp_path_factory):
    """6 windows of 48 tokens (the tiny student's context is 64) and 2 windows of 100 (longer than it)."""
    out = {}
    for name, seqlen, n in (("short", 48, 6), ("long", 100, 2)):
        out[name] = str(tmp_path_factory.mktemp("calib") / f"{name}.pt")
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "prepare_calibration_data.py"), "--input",
                        os.path.join(data_root, "c4", "en", "c4-train.00000-of-01024.head1000.json.gz"),
                        "--nsamples", str(n), "--seqlen", str(seqlen), "--out", out[name]], check=True,
                       capture_output=True)
    return out


def run_script(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------------ progress lines
def test_progress_line_gives_elapsed_time_and_eta_from_the_rate_so_far(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(cli.time, "time", lambda: clock[0])
    bar = cli.Progress(4, "wanda", unit="block", every=0, terminal=False)
    clock[0] += 10.0
    bar.update()  # 1 block in 10 s: 3 left at that rate
    clock[0] += 50.0
    bar.update(3)
    bar.close()
    assert capsys.readouterr().out.splitlines() == ["wanda: block 1/4 (25%), 10s elapsed, ETA 30s",
                                                    "wanda: block 4/4 (100%), 1m00s elapsed"]


def test_progress_lines_are_rate_limited_but_the_last_always_comes(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(cli.time, "time", lambda: clock[0])
    bar = cli.Progress(10, "train", unit="step", every=30, terminal=False)
    for _ in range(10):
        clock[0] += 7.0
        bar.update()  # a line at 35 s (step 5) and 70 s (step 10, the last)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["train: step 5/10 (50%), 35s elapsed, ETA 35s", "train: step 10/10 (100%), 1m10s elapsed"]
    cli.Progress(3, "quiet", enabled=False, terminal=False).update(3)
    assert capsys.readouterr().out == ""


def test_prune_and_evaluate_print_progress_lines_when_stdout_is_a_file(tiny_models, tiny_data, calibration,
                                                                      tmp_path):
    log = tmp_path / "prune.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "prune.py"), "--model", tiny_models["student"],
                               "--method", "wanda", "--calibration", calibration["short"], "--wikitext_dir",
                               tiny_data["wikitext_dir"], "--ppl_windows", "3", "--data_dir", tiny_data["data_dir"],
                               "--eval_iters", "1", "--num_threads", "1"], stdout=f, stderr=subprocess.PIPE,
                              text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    for expected in ("wanda: block 1/2 (50%)", "wanda: block 2/2 (100%)", "wikitext-2: window 3/3 (100%)",
                     "C4 validation: window 8/8 (100%)"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert any(line.startswith("wanda: block 1/2 (50%)") and "ETA" in line for line in lines)


# ------------------------------------------------------------------------------------------------ windows
def test_calibration_length_and_evaluation_window_are_separate_settings(tiny_models, tiny_data, calibration,
                                                                       tmp_path):
    res = prune.main(["--model", tiny_models["student"], "--method", "wanda", "--calibration", calibration["short"],
                      "--seqlen", "40", "--wikitext_dir", tiny_data["wikitext_dir"], "--ppl_windows", "2",
                      "--out", str(tmp_path / "w.pt"), "--num_threads", "1", "--device", "cpu"])
    # calibration cut to 40 tokens, perplexity on windows of the model's whole context (64), not of 40 or 48
    assert res["seqlen"] == 40 and res["eval_block_size"] == 64
    ev = evaluate_main(["--model", str(tmp_path / "w.pt"), "--wikitext_dir", tiny_data["wikitext_dir"],
                        "--ppl_windows", "2"])
    assert ev["eval_block_size"] == 64 and ev["wikitext_ppl"] == pytest.approx(res["wikitext_ppl"], rel=1e-6)
    # main.py trains on 32-token windows and reports perplexity on the same 64-token windows as the others
    trained = main_mod.main(["--config", "cpu_tiny", "--init_from", str(tmp_path / "w.pt"), "--data_dir",
                             tiny_data["data_dir"], "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir",
                             str(tmp_path / "run"), "--max_iters", "1", "--eval_interval", "100", "--ppl_windows", "2"])
    assert trained["eval_block_size"] == 64
    ev = evaluate_main(["--model", str(tmp_path / "run" / "ckpt.pt"), "--wikitext_dir", tiny_data["wikitext_dir"],
                        "--ppl_windows", "2", "--data_dir", tiny_data["data_dir"], "--eval_iters", "2"])
    assert ev["wikitext_ppl"] == pytest.approx(trained["wikitext_ppl"], rel=1e-6)
    assert ev["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    short = evaluate_main(["--model", str(tmp_path / "w.pt"), "--wikitext_dir", tiny_data["wikitext_dir"],
                           "--ppl_windows", "2", "--eval_block_size", "32"])
    assert short["eval_block_size"] == 32 and short["wikitext_ppl"] != pytest.approx(res["wikitext_ppl"], rel=1e-3)


def test_windows_longer_than_the_context_are_one_line_errors(tiny_models, calibration):
    for script, argv, match in (
            ("prune.py", ["--method", "wanda", "--calibration", calibration["long"]], "pass --seqlen 64 or less"),
            ("evaluate.py", ["--eval_block_size", "65"], "exceeds the model's context 64")):
        proc = run_script(script, "--model", tiny_models["student"], *argv, "--wikitext_dir", "")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and match in lines[0], proc.stderr


# ------------------------------------------------------------------------------------------------ sizes on disk
def test_masks_round_trip_through_bits_and_an_unchanged_init_mask_is_not_stored_twice():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 12, generator=g) > 0.5
    other = torch.rand(5, 12, generator=g) > 0.5
    sd = {"a.mask": mask, "a.init_mask": mask.clone(), "b.mask": other, "b.init_mask": mask.clone(),
          "a.weight": torch.randn(5, 12, generator=g)}
    packed = pack_masks(sd)
    assert packed["a.init_mask"] == {"same_as": "a.mask"}
    assert packed["a.mask"]["bits"].dtype == torch.uint8 and packed["a.mask"]["bits"].numel() == 60 // 8 + 1
    assert np.array_equal(np.unpackbits(packed["b.mask"]["bits"].numpy(), count=60), other.reshape(-1).numpy())
    back = unpack_masks(packed)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    back["a.init_mask"][0, 0] ^= True  # a copy, not the mask itself
    assert torch.equal(back["a.mask"], mask)


def test_a_pruned_checkpoint_costs_the_weights_plus_one_bit_per_masked_weight(tiny_gpt2_dir, tmp_path):
    pt, folder = str(tmp_path / "m.pt"), str(tmp_path / "m_hf")
    prune.main(["--model", tiny_gpt2_dir, "--method", "magnitude", "--out", pt, "--wikitext_dir", ""])
    prune.main(["--model", tiny_gpt2_dir, "--method", "magnitude", "--out", folder, "--wikitext_dir", ""])
    model = load_model(pt)
    masked = sum(layer.weight.numel() for _, layer in sparse_layers(model))
    safetensors = os.path.getsize(os.path.join(folder, "model.safetensors"))
    # the model's own fp32 safetensors, 1 bit per masked weight, Wanda's per-input statistic and pickle overhead
    statistics = sum(layer.input_sq.numel() * 4 for _, layer in sparse_layers(model))
    assert os.path.getsize(pt) <= safetensors + masked / 8 + statistics + 64 * 1024
    assert os.path.getsize(pt) < safetensors + masked / 2  # a byte per mask and init_mask would be 2 bytes
    # the masks read back from bits are those the export folder's zeros give
    ckpt, exported = load_checkpoint(pt), dict(sparse_layers(load_model(folder)))
    for name, layer in sparse_layers(model):
        assert ckpt["model"][name + ".mask"].dtype == torch.bool
        assert torch.equal(layer.mask, exported[name].mask) and torch.equal(layer.init_mask, layer.mask)


# ------------------------------------------------------------------------------------------------ training log
def test_the_log_shows_the_flip_ratio_only_after_masks_were_recomputed(tiny_models, tiny_data, tmp_path, capsys):
    main_mod.main(["--config", "cpu_tiny", "--student_model", tiny_models["student"], "--data_dir",
                   tiny_data["data_dir"], "--wikitext_dir", "", "--out_dir", str(tmp_path / "run"),
                   "--max_iters", "6", "--mask_update_interval", "3", "--eval_interval", "100"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ") and "loss " in line
             and "ms/iter" in line]
    assert [line.split(":")[0] for line in lines] == [f"iter {i}" for i in range(1, 7)]
    assert [i + 1 for i, line in enumerate(lines) if ", flip " in line] == [3, 6]
    rows = [json.loads(r) for r in open(tmp_path / "run" / "metrics.jsonl")]
    flips = {r["iter"]: r["flip_ratio"] for r in rows if "flip_ratio" in r and "loss" not in r}
    assert sorted(flips) == [3, 6]
    for line in lines[2::3]:  # the printed figure is that recompute's
        it = int(line.split(":")[0].split()[1])
        assert f", flip {flips[it]:.4f}," in line


def test_an_export_of_a_model_with_a_tied_head_stores_the_embedding_once(tmp_path):
    import transformers
    from safetensors import safe_open

    import families
    from conftest import save_tiny_family

    hf = save_tiny_family(str(tmp_path / "tied"), "llama", tie_word_embeddings=True)
    model = load_model(str(tmp_path / "tied"))
    families.save_pretrained(model, str(tmp_path / "out"), model.state_dict())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    idx = torch.randint(0, 1000, (1, 8))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert torch.equal(again(idx).logits, hf(idx).logits)
