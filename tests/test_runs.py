"""A run is never lost: one run per out_dir, resume checks, checkpoints, interrupts, and the one-line errors.

(SIGKILL, damaged checkpoints, a full disk and NaNs are in test_faults.py.)
"""
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import evaluate
import main as main_mod
import prune
from checkpoint import build_model, load_checkpoint, save_training_checkpoint
from cli import UserError
from config import RESUME_MAY_CHANGE, TrainConfig, config_warnings, parse_config
from conftest import REPO_ROOT, free_port
from data.loader import BinDataset, eval_offsets
from rundir import resume_changes, trim_metrics

TIMING = ("ms_per_iter", "tokens_per_s")


def flags(tiny_data, tiny_models, out_dir, *extra):
    return ["--config", "cpu_tiny", "--student_model", tiny_models["student"],
            "--teacher_model", tiny_models["teacher"], "--data_dir", tiny_data["data_dir"],
            "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(out_dir), *extra]


def rows(out_dir):
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def snapshot(out_dir):
    return {n: open(os.path.join(out_dir, n), "rb").read() for n in sorted(os.listdir(out_dir))}


def python(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, **kw)


def assert_one_line_error(proc, match, code=2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------- one run per out_dir
def test_a_new_run_never_overwrites_or_mixes_with_another(tiny_data, tiny_models, tmp_path):
    out = tmp_path / "run"
    main_mod.main(flags(tiny_data, tiny_models, out, "--max_iters", "3"))
    before = snapshot(out)
    for extra in ([], ["--learning_rate", "5e-3"]):
        with pytest.raises(UserError, match="already holds a run.*--init_from resume.*--out_dir.*--overwrite True"):
            main_mod.main(flags(tiny_data, tiny_models, out, "--max_iters", "3", *extra))
        assert snapshot(out) == before  # nothing written, nothing appended
    with pytest.raises(UserError, match="holds a training run .*--eval_only would replace its results.json"):
        main_mod.main(flags(tiny_data, tiny_models, out, "--eval_only", "True", "--overwrite", "True"))
    assert snapshot(out) == before
    # --overwrite replaces the old run whole: no row, checkpoint or checksum of it is left
    main_mod.main(flags(tiny_data, tiny_models, out, "--max_iters", "4", "--eval_interval", "4",
                        "--overwrite", "True"))
    assert [r["iter"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == [
        "ckpt-4.pt", "ckpt-4.pt.sha256", "ckpt.pt", "ckpt.pt.sha256"]


def test_resume_refuses_flags_that_change_the_run_and_records_those_that_may(tiny_data, tiny_models, tmp_path):
    out = tmp_path / "run"
    main_mod.main(flags(tiny_data, tiny_models, out, "--max_iters", "3"))
    before = snapshot(out)
    with pytest.raises(UserError) as e:
        main_mod.main(flags(tiny_data, tiny_models, out, "--max_iters", "6", "--init_from", "resume",
                            "--learning_rate", "2.5e-2", "--global_batch_size", "8", "--distill_model", "True"))
    message = str(e.value)
    for name in ("--learning_rate 0.025 (the run has 0.001)", "--global_batch_size 8 (the run has 4)",
                 "--distill_model True (the run has False)"):
        assert name in message, message
    assert "--max_iters" not in message and snapshot(out) == before
    res = main_mod.main(flags(tiny_data, tiny_models, out, "--init_from", "resume", "--max_iters", "6",
                              "--log_interval", "2", "--num_threads", "2", "--eval_interval", "100"))
    expected = [{"iter": 3, "changed": {"max_iters": [3, 6], "eval_interval": [3, 100], "log_interval": [1, 2],
                                        "num_threads": [1, 2]}}]
    assert res["resumes"] == expected and load_checkpoint(str(out / "ckpt.pt"))["resumes"] == expected
    assert load_checkpoint(str(out / "ckpt.pt"))["config"]["max_iters"] == 6


def test_which_flags_may_change_on_resume_is_a_list_beside_the_config():
    saved = dataclasses.asdict(TrainConfig())
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert RESUME_MAY_CHANGE <= set(fields)
    for name in ("max_iters", "eval_interval", "log_interval", "num_threads", "keep_checkpoints"):
        assert name in RESUME_MAY_CHANGE
    for name in ("student_model", "data_dir", "N", "M", "srste_decay", "distill_model", "batch_size",
                 "global_batch_size", "block_size", "learning_rate", "seed"):
        assert name not in RESUME_MAY_CHANGE
    # a flag the checkpoint does not know (added since) is run-changing unless listed, like every other
    cfg = TrainConfig(calib_nsamples=7, progress=False)
    del saved["calib_nsamples"], saved["progress"]
    with pytest.raises(UserError, match="--calib_nsamples 7 \\(the run has None\\)"):
        resume_changes(saved, cfg, "ckpt.pt")
    assert resume_changes(saved, TrainConfig(progress=False), "ckpt.pt") == {"progress": [None, False]}


def test_resume_trims_metrics_rows_a_crash_left_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"iter": 1, "loss": 3.0}, {"iter": 2, "loss": 2.0}, {"iter": 2, "val_loss": 2.5},
             {"iter": 3, "loss": 1.5}, {"iter": 4, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iter": 5, "lo')  # cut by the crash
    assert trim_metrics(str(path), 2) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
    assert trim_metrics(str(path), 2) == 0


def test_training_checkpoints_keep_the_last_k_each_with_a_sha256_that_sha256sum_accepts(tmp_path):
    for it in (1, 2, 3, 4):
        save_training_checkpoint({"iter_num": it, "x": torch.full((3,), float(it))}, str(tmp_path), keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt-3.pt", "ckpt-3.pt.sha256", "ckpt-4.pt", "ckpt-4.pt.sha256", "ckpt.pt", "ckpt.pt.sha256"]
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "ckpt-4.pt")  # the newest, at no extra space
    for name in ("ckpt-3.pt", "ckpt-4.pt", "ckpt.pt"):
        digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert (tmp_path / (name + ".sha256")).read_text() == f"{digest}  {name}\n"
    assert torch.load(tmp_path / "ckpt.pt")["iter_num"] == 4
    # a resume from an older checkpoint abandons the later ones (their timeline is being redone)
    save_training_checkpoint({"iter_num": 3, "x": torch.zeros(3)}, str(tmp_path), keep=2)
    assert not (tmp_path / "ckpt-4.pt").exists() and torch.load(tmp_path / "ckpt.pt")["iter_num"] == 3


# --------------------------------------------------------------------------------------------- interrupts
def fault(kind, n, args, **kw):
    return python(os.path.join(REPO_ROOT, "tests", "fault_runner.py"), kind, str(n), *args, **kw)


def test_first_interrupt_drops_the_evaluation_second_drops_the_step_and_resume_is_exact(tiny_data, tiny_models,
                                                                                         tmp_path):
    args = ["--max_iters", "6", "--eval_interval", "3"]
    main_mod.main(flags(tiny_data, tiny_models, tmp_path / "straight", *args))
    # one SIGINT in the middle of the evaluation at iter 3 (batches 11-20: 8 C4 + 2 WikiText per evaluation)
    proc = fault("sigint-eval", 15, flags(tiny_data, tiny_models, tmp_path / "a", *args))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    said, done = proc.stderr.index("SIGINT: stopping after the current training step"), \
        proc.stderr.index("stopped by SIGINT at iter 3")
    assert said < done and "--init_from resume" in proc.stderr
    assert not any("val_loss" in r and r["iter"] == 3 for r in rows(tmp_path / "a"))  # dropped, not half-logged
    # two SIGINTs inside the first micro-step of step 4: the step is dropped, the state before it saved
    proc = fault("sigint2-step", 9, flags(tiny_data, tiny_models, tmp_path / "b", *args))
    assert proc.returncode == 3 and "dropping the current step" in proc.stderr, proc.stderr
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["iter_num"] == 4
    for d in ("a", "b"):
        main_mod.main(flags(tiny_data, tiny_models, tmp_path / d, *args, "--init_from", "resume"))
        assert rows(tmp_path / d) == rows(tmp_path / "straight"), d
        a, b = (load_checkpoint(str(tmp_path / x / "ckpt.pt"))["model"] for x in (d, "straight"))
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_third_interrupt_exits_at_once_and_the_checkpoint_on_disk_is_intact(tiny_data, tiny_models, tmp_path):
    args = ["--max_iters", "6", "--eval_interval", "3"]
    proc = fault("sigint3-step", 9, flags(tiny_data, tiny_models, tmp_path, *args))
    assert proc.returncode == 130 and "exiting without saving" in proc.stderr, proc.stderr
    assert checkpoint.damage(str(tmp_path / "ckpt.pt")) is None
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 3


def torchrun(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            os.path.join(REPO_ROOT, "main.py"), *args]


def test_ctrl_c_under_torchrun_saves_every_rank_and_no_rank_prints_a_traceback(tiny_data, tiny_models, tmp_path):
    cmd = torchrun(flags(tiny_data, tiny_models, tmp_path, "--max_iters", "100000", "--eval_interval", "100000"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("iter 2: loss"):
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: the terminal signals torchrun
            break
    out = proc.stdout.read()
    proc.wait(timeout=120)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] >= 2 and len(ckpt["rng"]) == 2  # every rank's part
    assert f"stopped by SIGINT at iter {ckpt['iter_num']}" in out and out.count("stopped by SIGINT") == 1
    assert 'main.py", line' not in out  # torchrun reports the signal itself; no rank has a traceback


def test_user_errors_under_torchrun_are_printed_once(tiny_data, tiny_models, tmp_path):
    proc = subprocess.run(torchrun(flags(tiny_data, tiny_models, tmp_path, "--max_itres", "3")),
                          capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: unknown flag --max_itres (did you mean --max_iters?); see `python main.py --help` for "
                    "the valid flags"], proc.stderr
    assert 'main.py", line' not in proc.stderr and proc.returncode != 0


# --------------------------------------------------------------------------------------------- one-line errors
def test_mistyped_flags_say_what_was_meant(tmp_path):
    with pytest.raises(UserError, match="unknown flag --learnig_rate \\(did you mean --learning_rate\\?\\)"):
        parse_config(["--learnig_rate", "1e-3"])
    with pytest.raises(UserError, match="unknown flag --modle \\(did you mean --model\\?\\)"):
        evaluate.main(["--modle", "gpt2"])
    with pytest.raises(UserError, match="unknown flag --methd \\(did you mean --method\\?\\)"):
        prune.main(["--model", "gpt2", "--methd", "wanda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_in_every_script(tiny_gpt2_dir):
    for script in ("evaluate.py", "prune.py"):
        args = ["--model", tiny_gpt2_dir, "--device", "cuda"] + (["--method", "magnitude"] if script == "prune.py"
                                                                 else [])
        assert_one_line_error(python(script, *args), "--device cuda but no CUDA GPU is visible")


def test_help_into_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "main.py"), "-h"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    proc.stdout.close()  # `| head` gone before main.py writes
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_a_nanogpt_checkpoint_is_converted_and_trains(tiny_data, tiny_models, tmp_path):
    nano = make_nanogpt_checkpoint(tmp_path / "nanogpt.pt", bias=False)
    model = build_model(load_checkpoint(str(tmp_path / "nanogpt.pt"))).eval()
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ours = model(x, targets=x)[0]
        for approximate, tol in (("tanh", 1e-5), ("none", 5e-3)):  # nanoGPT's own GELU is the exact one
            ref = nanogpt_reference_logits(nano, x, approximate)
            assert torch.allclose(ours, ref, atol=tol, rtol=0), (approximate, (ours - ref).abs().max())
    res = main_mod.main(flags(tiny_data, tiny_models, tmp_path / "run", "--init_from", str(tmp_path / "nanogpt.pt"),
                              "--max_iters", "2", "--eval_interval", "2"))
    assert res["nm_ok"] and res["iter"] == 2
    bad = dict(torch.load(tmp_path / "nanogpt.pt", weights_only=False), model_args={**nano["model_args"], "n_kv": 2})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="nanoGPT checkpoint but its model_args has n_kv"):
        load_checkpoint(str(tmp_path / "bad.pt"))


def make_nanogpt_checkpoint(path, bias, n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304):
    """A checkpoint as nanoGPT's train.py writes it (torch.compile'd: every key has the `_orig_mod.` prefix)."""
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.wte.weight": torch.randn(vocab_size, n_embd, generator=g) * 0.02,
          "transformer.wpe.weight": torch.randn(block_size, n_embd, generator=g) * 0.02}
    shapes = {"ln_1": None, "attn.c_attn": (3 * n_embd, n_embd), "attn.c_proj": (n_embd, n_embd), "ln_2": None,
              "mlp.c_fc": (4 * n_embd, n_embd), "mlp.c_proj": (n_embd, 4 * n_embd)}
    for i in range(n_layer):
        for name, shape in shapes.items():
            p = f"transformer.h.{i}.{name}"
            sd[p + ".weight"] = 1 + 0.1 * torch.randn(n_embd, generator=g) if shape is None else \
                torch.randn(*shape, generator=g) * 0.05
            if bias:
                sd[p + ".bias"] = 0.1 * torch.randn(shape[0] if shape else n_embd, generator=g)
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size,
                                                                                                  block_size)
    sd["transformer.ln_f.weight"] = torch.ones(n_embd)
    if bias:
        sd["transformer.ln_f.bias"] = torch.zeros(n_embd)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                vocab_size=vocab_size, dropout=0.0)
    ckpt = {"model": {"_orig_mod." + k: v for k, v in sd.items()}, "optimizer": {}, "model_args": args,
            "iter_num": 5000, "best_val_loss": torch.tensor(3.1), "config": {"init_from": "scratch"}}
    torch.save(ckpt, path)
    return {"model": sd, "model_args": args}


def nanogpt_reference_logits(nano, idx, approximate):
    """nanoGPT's forward written out from its model.py (all positions' logits)."""
    sd, a = nano["model"], nano["model_args"]
    C, H = a["n_embd"], a["n_head"]
    get = lambda k: sd.get(k)  # noqa: E731  (biases are absent when bias=False)
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:idx.shape[1]]
    for i in range(a["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], get(p + "ln_1.bias"), 1e-5)
        q, k, v = F.linear(h, sd[p + "attn.c_attn.weight"], get(p + "attn.c_attn.bias")).split(C, dim=2)
        q, k, v = (t.view(*t.shape[:2], H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (C // H) ** 0.5
        T = idx.shape[1]
        att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(*x.shape)
        x = x + F.linear(y, sd[p + "attn.c_proj.weight"], get(p + "attn.c_proj.bias"))
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], get(p + "ln_2.bias"), 1e-5)
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], get(p + "mlp.c_fc.bias")), approximate=approximate)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], get(p + "mlp.c_proj.bias"))
    x = F.layer_norm(x, (C,), sd["transformer.ln_f.weight"], get("transformer.ln_f.bias"), 1e-5)
    return x @ sd["lm_head.weight"].t()


# --------------------------------------------------------------------------------------------- quiet surprises
def test_validation_windows_do_not_depend_on_the_micro_batch_size(tiny_data, tiny_gpt2_dir):
    from model import GPT
    model = GPT.from_pretrained(tiny_gpt2_dir, block_size=32).eval()
    val = BinDataset(os.path.join(tiny_data["data_dir"], "val.bin"), 32)
    # the reference: the eval_iters x 8 seeded windows, full logits, one cross-entropy over all of them
    offsets = eval_offsets(len(val), 32, evaluate.VAL_WINDOWS_PER_ITER, 3).reshape(-1)
    x, y = val.get_batch(offsets)
    with torch.no_grad():
        ref = F.cross_entropy(model(x, targets=y)[0].reshape(-1, 50257), y.reshape(-1)).item()
    for batch_size in (1, 3, 8, 24):
        assert evaluate.validation_loss(model, val, batch_size, 3) == pytest.approx(ref, rel=1e-5), batch_size


def test_settings_that_cannot_do_what_was_meant_are_errors_or_warnings():
    with pytest.raises(UserError, match="--prune_end 50 is after --max_iters 40"):
        parse_config(["--prune_schedule", "gradual", "--prune_end", "50", "--max_iters", "40"])
    with pytest.raises(UserError, match="prunes by magnitude.*--mask_metric wanda is not used"):
        parse_config(["--prune_schedule", "iterative", "--mask_metric", "wanda", "--prune_end", "10"])
    with pytest.raises(UserError, match="contradict"):
        parse_config(["--overwrite", "True", "--init_from", "resume"])
    short = config_warnings(parse_config(["--max_iters", "10"]))
    assert any("--warmup_iters 1000 >= --max_iters 10: the whole run is warm-up" in w for w in short)
    assert config_warnings(parse_config(["--max_iters", "100", "--warmup_iters", "10", "--lr_decay_iters",
                                         "100", "--increase_step", "50"])) == []
    assert any("--increase_step 10000 > --max_iters 100" in w
               for w in config_warnings(parse_config(["--max_iters", "100", "--warmup_iters", "10"])))
    assert any("--optimizer adamw has no SR-STE term" in w
               for w in config_warnings(parse_config(["--optimizer", "adamw"])))


def test_a_bare_resume_continues_the_run_with_its_own_settings(tiny_data, tiny_models, tmp_path):
    # the run starts from a sparse 4:8 checkpoint, so its config took N=4, M=8 from the model (not the flags)
    from model import GPT
    from sparsity import sparsify

    model = GPT.from_pretrained(tiny_models["student"])
    sparsify(model, n=4, m=8)
    start = str(tmp_path / "start.pt")
    checkpoint.save_checkpoint(checkpoint.model_state(model), start)
    schedule = ["--init_from", start, "--lr_decay_iters", "6", "--eval_interval", "3"]
    whole = main_mod.main(flags(tiny_data, tiny_models, tmp_path / "whole", *schedule, "--max_iters", "6"))
    main_mod.main(flags(tiny_data, tiny_models, tmp_path / "run", *schedule, "--max_iters", "3"))
    # nothing but the folder and the longer budget: data, model, sparsity and schedule come from the run
    resumed = main_mod.main(["--init_from", "resume", "--out_dir", str(tmp_path / "run"), "--max_iters", "6"])
    assert resumed["pattern"] == "4:8" and resumed["config"]["N"] == 4
    assert resumed["config"]["data_dir"] == tiny_data["data_dir"] and resumed["iter"] == 6
    assert resumed["wikitext_ppl"] == pytest.approx(whole["wikitext_ppl"], rel=1e-6)
    assert resumed["resumes"] == [{"iter": 3, "changed": {"max_iters": [3, 6]}}]
