"""main.py end to end on tiny random GPT-2 folders and the shared data: upstream commands, DDP, resume, errors."""
import json
import os
import random
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import main as main_mod
from checkpoint import load_checkpoint
from config import TrainConfig, flag_table_markdown, parse_config
from conftest import REPO_ROOT, free_port
from cli import UserError

UPSTREAM_NAIVE = """--learning_rate 2e-4 --min_lr 2e-5 --warmup_iters 2000 --lr_decay_iters 38000 --max_iters 40000
 --batch_size 8 --global_batch_size 128 --mode sparse_forward --mask_type structured --mask_metric 'magnitude'"""
UPSTREAM_BOOSTED = """--srste_decay 1e-4 --learning_rate 2e-4 --min_lr 2e-5 --teacher_model 'gpt2' --student_model 'gpt2'
 --warmup_iters 2000 --lr_decay_iters 38000 --increase_step 10000 --max_iters 40000 --batch_size 8
 --global_batch_size 128 --mask_metric 'magnitude' --mode sparse_forward --change_mask True --mask_type structured
 --SLoRB True --SLoRB_init_type "mean" --SLoRB_k 16 --trainable_projection True --distill_model True
 --hardness_task 0.33 --hardness_kldiv 0.67 --hardness_squarehead 0.0 --gradient_checkpointing True"""


def shrink(tiny_data, tiny_models, out_dir, *extra):
    """Overrides that make any command a seconds-long CPU run on the tiny folders."""
    return ["--config", "cpu_tiny", "--student_model", tiny_models["student"],
            "--teacher_model", tiny_models["teacher"], "--data_dir", tiny_data["data_dir"],
            "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(out_dir), *extra]


def small(tiny_data, tiny_models, out_dir):
    """Appended after an upstream command: later flags win, so these shrink it."""
    return ["--max_iters", "6", "--warmup_iters", "2", "--lr_decay_iters", "5", "--increase_step", "3",
            "--batch_size", "2", "--global_batch_size", "4", "--block_size", "32",
            *shrink(tiny_data, tiny_models, out_dir)]


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def run_cli(args, **kw):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "main.py"), *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, **kw)


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(REPO_ROOT, "main.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --------------------------------------------------------------------------------------------- upstream commands
@pytest.mark.parametrize("command", [UPSTREAM_NAIVE, UPSTREAM_BOOSTED], ids=["naive_retraining", "ast_boosted"])
def test_upstream_command_runs_single_process_and_under_torchrun(command, tiny_data, tiny_models, tmp_path):
    upstream = shlex.split(command.replace("\n", " "))
    one = main_mod.main(upstream + small(tiny_data, tiny_models, tmp_path / "one"))
    assert one["iter"] == 6 and one["nm_ok"] and one["mean_sparsity"] == pytest.approx(0.5)
    proc = torchrun(upstream + small(tiny_data, tiny_models, tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "results.json"))
    assert two["world_size"] == 2 and two["masks_identical_across_ranks"] and two["nm_ok"]
    # the same global batch on 1 and 2 ranks: the same losses, and the same final masks
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for it in l1:
        assert l2[it] == pytest.approx(l1[it], rel=1e-5, abs=1e-5)
    m1, m2 = (load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in ("one", "two"))
    for k in m1:
        if k.endswith("mask"):
            assert torch.equal(m1[k], m2[k]), k


# --------------------------------------------------------------------------------------------- resume
AST_FULL = ["--distill_model", "True", "--SLoRB", "True", "--trainable_projection", "True", "--srste_decay", "1e-2",
            "--increase_step", "3", "--mask_update_interval", "2", "--learning_rate", "3e-3"]


def assert_same_final_state(dir_a, dir_b):
    a, b = load_checkpoint(str(dir_a / "ckpt.pt")), load_checkpoint(str(dir_b / "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_continues_exactly(tiny_data, tiny_models, tmp_path):
    straight = main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "straight", *AST_FULL, "--max_iters", "6"))
    main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "split", *AST_FULL, "--max_iters", "3"))
    resumed = main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "split", *AST_FULL, "--max_iters", "6",
                                   "--init_from", "resume"))
    ls, lr = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(lr) == sorted(ls) == list(range(1, 7))  # appended, not truncated
    for it in ls:
        assert abs(ls[it] - lr[it]) <= 1e-6, it
    assert_same_final_state(tmp_path / "straight", tmp_path / "split")
    for key in ("wikitext_ppl", "val_loss", "mean_sparsity"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key
    # the resumed run's own N:M claim against a count of the saved masks: exactly 2 of every 4 kept
    masks = [v for k, v in load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["model"].items()
             if k.endswith(".mask")]
    assert masks and all(bool((m.reshape(-1, 4).sum(1) == 2).all()) for m in masks) and resumed["nm_ok"] is True


def test_sigterm_saves_and_resume_continues_exactly(tiny_data, tiny_models, tmp_path):
    n = 12
    args = AST_FULL + ["--max_iters", str(n), "--lr_decay_iters", str(n), "--eval_interval", "100"]
    main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "straight", *args))
    stop_after = random.Random().randint(2, n - 3)
    cmd = [sys.executable, "-u", os.path.join(REPO_ROOT, "main.py"),
           *shrink(tiny_data, tiny_models, tmp_path / "killed", *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    for line in proc.stdout:
        if line.startswith(f"iter {stop_after}: loss"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 3, rest  # interrupted, saved: its own exit code
    assert "stopped by SIGTERM" in rest and "Traceback" not in rest
    stopped_at = load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))["iter_num"]
    assert stop_after <= stopped_at < n
    main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "killed", *args, "--init_from", "resume"))
    ls, lk = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(lk) == list(range(1, n + 1))
    for it in ls:
        assert abs(ls[it] - lk[it]) <= 1e-6, it
    assert_same_final_state(tmp_path / "straight", tmp_path / "killed")


# --------------------------------------------------------------------------------------------- flags
def test_change_mask_false_really_keeps_the_initial_mask(tiny_data, tiny_models, tmp_path):
    base = ["--learning_rate", "5e-2", "--mask_update_interval", "1", "--eval_interval", "100"]
    main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "fixed", *base, "--change_mask", "False"))
    main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "moving", *base, "--change_mask", "true"))
    fixed = load_checkpoint(str(tmp_path / "fixed" / "ckpt.pt"))["model"]
    moving = load_checkpoint(str(tmp_path / "moving" / "ckpt.pt"))["model"]
    masks = [k for k in fixed if k.endswith(".mask")]
    assert masks
    assert all(torch.equal(fixed[k], fixed[k.replace(".mask", ".init_mask")]) for k in masks)
    assert any(not torch.equal(moving[k], moving[k.replace(".mask", ".init_mask")]) for k in masks)
    assert not any("flip_ratio" in json.loads(l) and "loss" not in json.loads(l)
                   for l in open(tmp_path / "fixed" / "metrics.jsonl"))


def test_config_file_then_command_line_precedence(tmp_path):
    cfg_file = tmp_path / "my.py"
    cfg_file.write_text("learning_rate = 1e-3\nbatch_size = 4\nchange_mask = False\noutput_flip_every = 7\n")
    cfg = parse_config(["--config", str(cfg_file), "--batch_size=2", "--SLoRB", "1"])
    assert cfg.learning_rate == 1e-3 and cfg.batch_size == 2 and cfg.change_mask is False and cfg.SLoRB is True
    assert cfg.mask_update_interval == 7
    assert cfg.max_iters == TrainConfig().max_iters  # untouched default
    for text, value in (("True", True), ("false", False), ("1", True), ("0", False), ("true", True)):
        assert parse_config(["--change_mask", text]).change_mask is value
    assert parse_config(["--output_flip_every=3"]).mask_update_interval == 3


@pytest.mark.parametrize("argv,match", [
    (["--no_such_flag", "1"], "unknown flag --no_such_flag"),
    (["--mask_metric", "random"], "not one of magnitude, wanda"),
    (["--change_mask", "maybe"], "change_mask"),
    (["--N", "5", "--M", "4"], "0 < N <= M"),
    (["--max_iters", "ten"], "expected int"),
    (["--batch_size"], "has no value"),
])
def test_bad_flags_are_one_line_errors(argv, match):
    with pytest.raises(UserError, match=match):
        parse_config(argv)


def test_user_errors_exit_2_with_one_line_and_no_traceback(tiny_data, tiny_models, tmp_path):
    cases = [
        (["--data_dir", str(tmp_path / "nodata")], "train.bin not found"),
        (["--student_model", str(tmp_path / "nomodel")], "not found"),
        (["--block_size", "128"], "exceeds"),
        (["--global_batch_size", "5"], "not divisible"),
        (["--N", "5", "--M", "4"], "0 < N <= M"),
        (["--bogus", "1"], "unknown flag"),
        (["--init_from", "resume", "--out_dir", str(tmp_path / "empty")], "does not exist"),
    ]
    for extra, match in cases:
        proc = run_cli(shrink(tiny_data, tiny_models, tmp_path / "out", *extra))
        assert proc.returncode == 2, (extra, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], (extra, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_eval_only_evaluates_a_checkpoint_without_training(tiny_data, tiny_models, tmp_path):
    main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "run"))
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    before = os.path.getmtime(ckpt)
    res = main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "eval", "--eval_only", "True", "--init_from", ckpt))
    trained = json.load(open(tmp_path / "run" / "results.json"))
    assert res["wikitext_ppl"] == pytest.approx(trained["wikitext_ppl"], rel=1e-6) and res["nm_ok"]
    assert os.path.getmtime(ckpt) == before and not (tmp_path / "eval" / "ckpt.pt").exists()


def test_empty_wikitext_dir_trains_without_perplexity_and_the_same_c4_loss(tiny_data, tiny_models, tmp_path):
    with_ppl = main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "a", "--max_iters", "3"))
    args = shrink(tiny_data, tiny_models, tmp_path / "b", "--max_iters", "3")
    args[args.index("--wikitext_dir") + 1] = ""
    without = main_mod.main(args)
    assert without["wikitext_ppl"] is None and with_ppl["wikitext_ppl"] > 1
    assert without["val_loss"] == with_ppl["val_loss"]  # the same run otherwise
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert any("val_loss" in r and r["wikitext_ppl"] is None for r in rows)


def test_docs_flag_table_is_generated_from_the_dataclass():
    page = open(os.path.join(REPO_ROOT, "docs", "flags.md")).read()
    assert flag_table_markdown() in page, "regenerate the flag table of docs/flags.md: python -c 'import config; " \
                                          "print(config.flag_table_markdown())'"


def test_lr_schedule_warmup_cosine_and_tail():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=210)
    # the published warm-up, lr * it / warmup_iters: 0 at step 0, 0.1 at step 1, 0.9 at step 9
    assert [main_mod.get_lr(it, cfg) for it in (0, 1, 5, 9)] == pytest.approx([0.0, 0.1, 0.5, 0.9])
    assert main_mod.get_lr(10, cfg) == pytest.approx(1.0)
    assert main_mod.get_lr(60, cfg) == pytest.approx(0.55)
    assert main_mod.get_lr(110, cfg) == pytest.approx(0.1)
    assert main_mod.get_lr(160, cfg) == pytest.approx(0.05)  # linear to zero, as published
    assert main_mod.get_lr(210, cfg) == pytest.approx(0.0)
    cfg.lr_tail = "hold"
    assert main_mod.get_lr(160, cfg) == pytest.approx(0.1)
    cfg.lr_warmup = "nanogpt"  # newer nanoGPT: lr * (it + 1) / (warmup_iters + 1)
    assert [main_mod.get_lr(it, cfg) for it in (0, 9, 10)] == pytest.approx([1 / 11, 10 / 11, 1.0])


def two_steps_of_configured_optimizer(optimizer, srste_decay):
    """main.py's optimizer for a one-layer 2:4 model, two steps on fixed gradients: (optimizer, start, end)."""
    from types import SimpleNamespace
    from sparsity import sparsify
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 2, bias=False))
    sparsify(model, filter_fn=lambda name, module: True)
    cfg = TrainConfig(optimizer=optimizer, srste_decay=srste_decay, weight_decay=0.0, learning_rate=1e-2)
    opt = main_mod.configure_optimizer(model, cfg, SimpleNamespace(device_type="cpu"))
    weight = model[0].weight
    start = weight.detach().clone()
    for t in (1, 2):
        weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(t))
        opt.param_groups[0]["srste_lambda"] = srste_decay
        opt.step()
    return opt, start, weight.detach().clone()


def test_srste_decay_0_runs_the_papers_optimizer_with_lambda_0_not_adamw():
    """The optimizer is the one --optimizer names, whatever --srste_decay is (the published code always uses its
    own): with lambda = 0 the paper's update builds the second moment from u = m_hat, AdamW from the gradient."""
    from sparsity import SRSTEAdamW
    opt, w, paper = two_steps_of_configured_optimizer("ast", 0.0)
    assert isinstance(opt, SRSTEAdamW) and opt.variant == "paper"
    lr, b1, b2, eps = 1e-2, 0.9, 0.95, 1e-8
    m, v, hand = torch.zeros_like(w), torch.zeros_like(w), w.clone()
    for t in (1, 2):  # by hand: u = m_hat (d = 0), v from u^2, step u / (sqrt(v_hat) + eps)
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(t))
        m = b1 * m + (1 - b1) * g
        u = m / (1 - b1 ** t)
        v = b2 * v + (1 - b2) * u * u
        hand = hand - lr * u / ((v / (1 - b2 ** t)).sqrt() + eps)
    assert torch.allclose(paper, hand, atol=1e-7)
    adamw_opt, _, adamw = two_steps_of_configured_optimizer("adamw", 0.0)
    assert type(adamw_opt) is torch.optim.AdamW and not torch.allclose(paper, adamw, atol=1e-4)
    classic_opt, _, classic = two_steps_of_configured_optimizer("classic", 0.0)
    assert classic_opt.variant == "classic" and torch.allclose(classic, adamw, atol=1e-6)  # lambda 0: AdamW
    assert two_steps_of_configured_optimizer("ast", 1e-4)[0].variant == "paper"


def test_plot_draws_a_png_from_metrics(tiny_data, tiny_models, tmp_path):
    import plot

    main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "run"))
    series = plot.read_metrics(str(tmp_path / "run"))
    assert series["loss"][0] == list(range(1, 7)) and series["val_loss"][0] == [0, 3, 6]
    out = plot.plot_runs([str(tmp_path / "run")], str(tmp_path / "c.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_stops_with_one_line(tiny_data, tiny_models, tmp_path):
    # (tests/test_faults.py injects NaNs into a loss and a gradient and checks the last good checkpoint is kept)
    proc = run_cli(shrink(tiny_data, tiny_models, tmp_path / "run", "--learning_rate", "1e38", "--min_lr", "1e38",
                          "--grad_clip", "0"))
    assert proc.returncode == 2 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_final_evaluation_sizes_are_the_ones_results_json_reports(tiny_data, tiny_models, tmp_path):
    """Cheap evaluations for the curves, a larger last one for the result, equal to evaluate.py's on the model."""
    import evaluate

    res = main_mod.main(shrink(tiny_data, tiny_models, tmp_path / "run", "--eval_iters", "1", "--ppl_windows", "2",
                               "--final_eval_iters", "3", "--final_ppl_windows", "5"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final = [r for r in rows if "final_val_loss" in r]
    assert len(final) == 1 and final[0]["iter"] == 6
    assert (res["eval_iters"], res["ppl_windows"]) == (3, 5)
    assert (res["val_loss"], res["wikitext_ppl"]) == (final[0]["final_val_loss"], final[0]["final_wikitext_ppl"])
    curve_last = [r for r in rows if "wikitext_ppl" in r][-1]
    assert curve_last["iter"] == 6 and curve_last["wikitext_ppl"] != res["wikitext_ppl"]  # 2 windows, not 5
    ref = evaluate.main(["--model", str(tmp_path / "run" / "ckpt.pt"), "--wikitext_dir", tiny_data["wikitext_dir"],
                         "--data_dir", tiny_data["data_dir"], "--batch_size", "2",  # both: the model's context
                         "--eval_iters", "3", "--ppl_windows", "5", "--device", "cpu"])
    assert res["wikitext_ppl"] == pytest.approx(ref["wikitext_ppl"], rel=1e-6)
    assert res["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
