"""--parallel fsdp (FSDP2 over 2 gloo ranks under torchrun) against one process: the same losses, masks and final
weights with mask updates, SR-STE, SLoRB and distillation on; kill -9 of a rank and resume; the sharded
checkpoint exports to the same folder as the one-process run's."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import export
import main as main_mod
import parallelize
from checkpoint import load_model, sharded_checkpoint
from conftest import REPO_ROOT, free_port
from sparsity import sparse_layers

AST_FULL = ["--distill_model", "True", "--SLoRB", "True", "--trainable_projection", "True", "--srste_decay", "1e-2",
            "--increase_step", "3", "--mask_update_interval", "2", "--learning_rate", "3e-3", "--max_iters", "6",
            "--lr_decay_iters", "6"]


def args_for(student, teacher, tiny_data, out_dir, *extra):
    return ["--config", "cpu_tiny", "--student_model", student, "--teacher_model", teacher,
            "--data_dir", tiny_data["data_dir"], "--wikitext_dir", tiny_data["wikitext_dir"],
            "--out_dir", str(out_dir), "--eval_iters", "3", "--ppl_windows", "3",  # odd: ranks do unequal shares
            *AST_FULL, *extra]


def torchrun_cmd(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            os.path.join(REPO_ROOT, "main.py"), *args]


def run_torchrun(args):
    proc = subprocess.run(torchrun_cmd(args), capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def assert_same_model(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key.endswith("mask"):
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=atol, msg=key)


@pytest.fixture(scope="module")
def pair(tiny_models, family_models):
    return {"gpt2": (tiny_models["student"], tiny_models["teacher"]),
            "llama": (family_models["llama"]["student"], family_models["llama"]["teacher"])}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fsdp_on_two_ranks_trains_like_one_process_and_exports_the_same_folder(family, pair, tiny_data,
                                                                                tmp_path):
    student, teacher = pair[family]
    # GPT-2 also scores the final model zero-shot: under fsdp every rank runs the harness's forwards in lockstep
    extra = ["--zeroshot_tasks", "arc_easy", "--zeroshot_limit", "4"] if family == "gpt2" else []
    one = main_mod.main(args_for(student, teacher, tiny_data, tmp_path / "one", *extra))
    run_torchrun(args_for(student, teacher, tiny_data, tmp_path / "two", "--parallel", "fsdp", *extra))
    two = json.load(open(tmp_path / "two" / "results.json"))
    if extra:
        a, b = one["zeroshot"]["tasks"]["arc_easy"], two["zeroshot"]["tasks"]["arc_easy"]
        assert b["n"] == a["n"] == 4 and b["acc"] == a["acc"] and b["acc_norm"] == a["acc_norm"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["wikitext_ppl"] == pytest.approx(one["wikitext_ppl"], rel=1e-5)
    assert two["parallel"] == "fsdp" and two["world_size"] == 2 and two["masks_identical_across_ranks"] is None
    assert two["nm_ok"] and two["mean_sparsity"] == pytest.approx(0.5) and two["params_nonzero"] == one["params_nonzero"]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for it in l1:
        assert l2[it] == pytest.approx(l1[it], rel=1e-5), it
    folder = sharded_checkpoint(str(tmp_path / "two" / "ckpt"))
    assert folder and sorted(f for f in os.listdir(folder) if f.endswith(".distcp")) == ["__0_0.distcp",
                                                                                        "__1_0.distcp"]
    a, b = load_model(str(tmp_path / "one" / "ckpt.pt")), load_model(str(tmp_path / "two" / "ckpt"))
    assert_same_model(a, b)
    for name, path in (("one", tmp_path / "one" / "ckpt.pt"), ("two", tmp_path / "two" / "ckpt")):
        res = export.main(["--checkpoint", str(path), "--out", str(tmp_path / f"hf_{name}")])
        assert res["verify"]["ok"] and res["verify"]["nm_violations"] == 0
    assert_same_model(load_model(str(tmp_path / "hf_one")), load_model(str(tmp_path / "hf_two")))
    # by content: 2 of every 4 largest |W| of the sharded run's final weights, and exactly those exported non-zero
    exported = dict(sparse_layers(load_model(str(tmp_path / "hf_two"))))
    for name, layer in sparse_layers(b):
        assert torch.equal(layer.mask, expected_mask(layer.weight.detach(), "structured")), name
        assert torch.equal(exported[name].weight.detach() != 0, layer.mask), name


def test_kill_9_of_one_rank_then_resume_gives_the_uninterrupted_result(pair, tiny_data, tmp_path):
    student, teacher = pair["gpt2"]
    extra = ("--parallel", "fsdp", "--eval_interval", "2")
    run_torchrun(args_for(student, teacher, tiny_data, tmp_path / "straight", *extra))
    killed = args_for(student, teacher, tiny_data, tmp_path / "killed", *extra)
    proc = subprocess.Popen(torchrun_cmd(killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # rank 0 prints; iter 3 comes after the sharded checkpoint of iter 2
        if line.startswith("iter 3: loss"):
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    proc.stdout.read()
    assert proc.wait(timeout=120) != 0
    time.sleep(1)
    assert sharded_checkpoint(str(tmp_path / "killed" / "ckpt"))
    run_torchrun([*killed, "--init_from", "resume"])
    assert_same_model(load_model(str(tmp_path / "straight" / "ckpt")), load_model(str(tmp_path / "killed" / "ckpt")),
                      atol=0)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert all(resumed[it] == straight[it] for it in (4, 5, 6))


def selection_units(t, mask_type):
    """t reshaped into the sets each mask type chooses within: 4 inputs of a row, a row, the whole layer."""
    return t.reshape(-1, {"structured": 4, "unstructured": t.shape[1], "unstructured_layer": t.numel()}[mask_type])


def expected_mask(weight, mask_type):
    """Each mask type's choice, written out from its definition: the top half of |W| in each selection unit (2 of
    every 4 inputs of a row, half of each row, half of the whole layer), ties to the lower index."""
    scores = selection_units(weight.abs(), mask_type)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :scores.shape[1] // 2]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True).reshape(weight.shape)


@pytest.mark.parametrize("mask_type", ["unstructured", "unstructured_layer"])
def test_unstructured_masks_under_fsdp_give_the_single_process_masks(mask_type, tiny_data, tiny_models,
                                                                     tmp_path):
    """Per-row and per-layer masks recomputed on 2 ranks, each holding half the rows (N:M masks: the first test of
    this file), by content: on the FSDP run's own final weights they are the type's choice over whole rows and
    layers (the last recompute comes after the last step), its export keeps exactly those weights non-zero, and
    they are the one-process run's masks up to near-ties (2 ranks sum gradients in another order, so the weights
    agree to about 1e-5, and a near-tie may fall either way)."""
    args = ["--config", "cpu_tiny", "--student_model", tiny_models["student"], "--data_dir", tiny_data["data_dir"],
            "--wikitext_dir", "", "--eval_iters", "1", "--mask_type", mask_type, "--mask_update_interval", "2",
            "--max_iters", "4", "--lr_decay_iters", "4", "--learning_rate", "3e-2", "--eval_interval", "100"]
    main_mod.main([*args, "--out_dir", str(tmp_path / "one")])
    run_torchrun([*args, "--out_dir", str(tmp_path / "two"), "--parallel", "fsdp"])
    moved = [r["flip_ratio_init"] for r in map(json.loads, open(tmp_path / "one" / "metrics.jsonl"))
             if "flip_ratio_init" in r]
    assert moved and moved[-1] > 0  # the masks did move, so the recompute under sharding was exercised
    export.main(["--checkpoint", str(tmp_path / "two" / "ckpt"), "--out", str(tmp_path / "hf_two")])
    single = dict(sparse_layers(load_model(str(tmp_path / "one" / "ckpt.pt"))))
    sharded = dict(sparse_layers(load_model(str(tmp_path / "two" / "ckpt"))))
    exported = dict(sparse_layers(load_model(str(tmp_path / "hf_two"))))
    assert single.keys() == sharded.keys() == exported.keys() and len(single) == 8
    for name, layer in sharded.items():
        assert torch.equal(layer.mask, expected_mask(layer.weight.detach(), mask_type)), name
        recomputed = exported[name].weight.detach() != 0
        assert torch.equal(recomputed, layer.mask), name
        one = single[name]
        assert torch.equal(one.mask, expected_mask(one.weight.detach(), mask_type)), name
        # where the two differ, both keep sets of (nearly) the same total |W| of the one-process weights
        scores = selection_units(one.weight.detach().abs(), mask_type)
        kept_one = (scores * selection_units(one.mask, mask_type)).sum(1)
        kept_two = (scores * selection_units(recomputed, mask_type)).sum(1)
        assert (recomputed != one.mask).float().mean() < 1e-3, name
        torch.testing.assert_close(kept_two, kept_one, rtol=0, atol=1e-4, msg=name)


def test_mask_rows_pack_and_unpack_exactly():
    g = torch.Generator().manual_seed(0)
    for rows, have, cols in ((5, 5, 12), (5, 3, 12), (4, 0, 20), (3, 2, 7)):
        mask = torch.rand(have, cols, generator=g) > 0.5
        packed = parallelize._pack(mask, rows)
        assert packed.dtype == torch.uint8 and len(packed) == -(-rows * cols // 8)
        back = parallelize._unpack(packed, rows, cols)
        assert torch.equal(back[:have], mask) and not back[have:].any()
    experts = torch.rand(3, 6, 8, generator=g) > 0.5  # a mixture-of-experts mask: rows are experts
    back = parallelize._unpack(parallelize._pack(experts, 4), 4, (6, 8))
    assert back.shape == (4, 6, 8) and torch.equal(back[:3], experts) and not back[3:].any()


def test_local_rows_follow_torch_chunk():
    for rows in (1, 5, 12, 13):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world)
            for rank in range(world):
                lo, hi = parallelize.local_rows(rows, rank, world)
                want = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(lo, hi)) == want, (rows, world, rank)


def test_fsdp_without_torchrun_and_with_gmp_are_one_line_errors(tiny_data, tiny_models, tmp_path):
    for extra, message in ((["--parallel", "fsdp"], "torchrun"),
                           (["--parallel", "fsdp", "--prune_schedule", "gradual", "--prune_end", "4"],
                            "use --parallel ddp")):
        proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "main.py"), "--config", "cpu_tiny",
                               "--student_model", tiny_models["student"], "--data_dir", tiny_data["data_dir"],
                               "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(tmp_path), *extra],
                              capture_output=True, text=True, cwd=REPO_ROOT)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
