"""Fault injection on a tiny CPU model: real SIGKILLs (at chosen and at seeded random points, including inside a
checkpoint write and inside an evaluation), damaged checkpoints, a full disk, NaNs.

After a kill, resuming must give the uninterrupted run's metrics, final weights, masks and optimizer state
exactly; a damaged checkpoint is detected and the one before it resumed or named; a failed write or a NaN stops
the run with the last good checkpoint intact.
"""
import errno
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import main as main_mod
import model as model_mod
from checkpoint import damage, load_checkpoint, newest_intact
from cli import UserError
from conftest import REPO_ROOT

# AST-Boosted in small: distillation, SLoRB with a trained projection, annealed SR-STE, changing masks
RUN = ["--distill_model", "True", "--SLoRB", "True", "--trainable_projection", "True", "--srste_decay", "1e-2",
       "--increase_step", "3", "--learning_rate", "3e-3", "--max_iters", "8", "--eval_interval", "3",
       "--keep_checkpoints", "2"]
EVAL_BATCHES = 10  # per evaluation: eval_iters 2 x 8 C4 windows + 4 WikiText windows, 2 at a time
TIMING = ("ms_per_iter", "tokens_per_s")


def flags(tiny_data, tiny_models, out_dir, *extra):
    return ["--config", "cpu_tiny", "--student_model", tiny_models["student"],
            "--teacher_model", tiny_models["teacher"], "--data_dir", tiny_data["data_dir"],
            "--wikitext_dir", tiny_data["wikitext_dir"], "--out_dir", str(out_dir), *extra]


def counting(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)
    return wrapper


@pytest.fixture(scope="module")
def straight(tiny_data, tiny_models, tmp_path_factory):
    """The uninterrupted run, and the forwards, torch.saves and renames into place it made (where kills land)."""
    out = tmp_path_factory.mktemp("straight")
    calls = {"forward": [], "save": [], "install": []}
    real = model_mod.GPT.forward, checkpoint.torch.save, checkpoint._install
    model_mod.GPT.forward = counting(real[0], calls["forward"])
    checkpoint.torch.save = counting(real[1], calls["save"])
    checkpoint._install = counting(real[2], calls["install"])
    try:
        main_mod.main(flags(tiny_data, tiny_models, out, *RUN))
    finally:
        model_mod.GPT.forward, checkpoint.torch.save, checkpoint._install = real
    return out, calls


def metrics(out_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def assert_same_run(reference, out):
    assert metrics(out) == metrics(reference)  # every loss, lr, lambda, flip ratio and evaluation, in order
    a, b = load_checkpoint(str(out / "ckpt.pt")), load_checkpoint(str(reference / "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == 8
    for k in b["model"]:  # weights, masks, SLoRB
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb if torch.is_tensor(sb[k]))
    ra, rb = (json.load(open(d / "results.json")) for d in (out, reference))
    assert (ra["val_loss"], ra["wikitext_ppl"]) == (rb["val_loss"], rb["wikitext_ppl"])


def run_to_the_end(args, out):
    """What a user does after a crash: resume (or start again if nothing was saved yet)."""
    resumable = newest_intact(str(out))[0] is not None
    main_mod.main(args + (["--init_from", "resume"] if resumable else ["--overwrite", "True"]))


def kill_point(trial, calls):
    """(fault_runner kind, N) of a trial."""
    if trial == "inside the write of ckpt-6.pt":  # torch.save(obj, path): path is the temporary name
        return "write", 1 + [os.path.basename(str(c[1])) for c in calls["save"]].index("ckpt-6.pt.tmp")
    if trial == "between ckpt-6.pt and ckpt.pt":  # _install(tmp, path, digest): the one after ckpt-6.pt's
        return "install", 2 + [os.path.basename(str(c[1])) for c in calls["install"]].index("ckpt-6.pt")
    if trial == "inside the evaluation at iter 3":
        return "eval", EVAL_BATCHES + EVAL_BATCHES // 2
    seed = int(trial.split()[-1])  # anywhere: a seeded forward of the student, the teacher or an evaluation
    return "forward", random.Random(seed).randint(1, len(calls["forward"]))


@pytest.mark.parametrize("trial", ["inside the write of ckpt-6.pt", "between ckpt-6.pt and ckpt.pt",
                                   "inside the evaluation at iter 3", "random seed 0", "random seed 1",
                                   "random seed 2"])
def test_sigkill_then_resume_reproduces_the_uninterrupted_run_exactly(trial, straight, tiny_data, tiny_models,
                                                                      tmp_path):
    reference, calls = straight
    kind, n = kill_point(trial, calls)
    args = flags(tiny_data, tiny_models, tmp_path, *RUN)
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "fault_runner.py"), kind, str(n), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == -9, (trial, proc.returncode, proc.stderr[-2000:])  # really killed
    if kind == "write":  # died with half a file under the temporary name; the previous checkpoint untouched
        assert (tmp_path / "ckpt-6.pt.tmp").exists() and not (tmp_path / "ckpt-6.pt").exists()
        assert damage(str(tmp_path / "ckpt.pt")) is None
    if kind == "install":  # ckpt-6.pt complete, ckpt.pt still the one of iter 3: resume takes the newer
        assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 3
        assert newest_intact(str(tmp_path))[0] == str(tmp_path / "ckpt-6.pt")
    run_to_the_end(args, tmp_path)
    assert_same_run(reference, tmp_path)


def flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("how", ["truncated", "bit flipped"])
def test_a_damaged_newest_checkpoint_is_detected_and_the_one_before_is_resumed(how, straight, tiny_data, tiny_models,
                                                                                tmp_path, capsys):
    reference, _ = straight
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    os.remove(out / "ckpt.pt")
    os.link(out / "ckpt-8.pt", out / "ckpt.pt")  # as main.py leaves them: one file under two names
    if how == "truncated":
        os.truncate(out / "ckpt-8.pt", os.path.getsize(out / "ckpt-8.pt") // 2)
    else:
        flip_a_byte(out / "ckpt-8.pt")
    with pytest.raises(UserError, match=f"ckpt.pt fails its sha256 check .*the newest intact checkpoint beside it "
                                        f"is {out / 'ckpt-6.pt'} \\(iter 6\\)"):
        load_checkpoint(str(out / "ckpt.pt"))  # what evaluate.py / export.py / --init_from see
    args = flags(tiny_data, tiny_models, out, *RUN)
    main_mod.main(args + ["--init_from", "resume"])
    assert f"{out / 'ckpt-8.pt'} fails its sha256 check" in capsys.readouterr().err
    assert_same_run(reference, out)
    # with nothing intact left, resume says so and how to start again
    assert os.path.samefile(out / "ckpt.pt", out / "ckpt-8.pt")
    for name in ("ckpt-6.pt", "ckpt-8.pt"):
        flip_a_byte(out / name)
    with pytest.raises(UserError, match="no intact checkpoint .*--overwrite True"):
        main_mod.main(args + ["--init_from", "resume"])


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_stops_with_one_line(tiny_data, tiny_models,
                                                                                       tmp_path, monkeypatch):
    real = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("ckpt-6.pt.tmp"):
            with open(path, "wb") as f:
                f.write(b"\0" * 4096)  # what fitted
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match="could not write .*ckpt-6.pt \\(No space left on device\\); .* was left as "
                                        "it was: free disk space"):
        main_mod.main(flags(tiny_data, tiny_models, tmp_path, "--max_iters", "6", "--eval_interval", "3"))
    assert damage(str(tmp_path / "ckpt.pt")) is None and load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nan_in_the_loss_or_a_gradient_stops_the_run_and_keeps_the_last_good_checkpoint(where, tiny_data,
                                                                                          tiny_models, tmp_path,
                                                                                          monkeypatch):
    real, calls = model_mod.GPT.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += self.training
        out = real(self, *args, **kwargs)
        if self.training and calls[0] == 9:  # the first micro-step of the step from iter 4
            if where == "loss":
                return out[0], out[1] * float("nan"), *out[2:]
            weight = self.transformer.h[0].mlp.c_fc.weight
            handle = []
            handle.append(weight.register_hook(lambda g: (handle[0].remove(), g * float("nan"))[1]))
        return out

    monkeypatch.setattr(model_mod.GPT, "forward", forward)
    with pytest.raises(UserError, match="non-finite .* at iter 4.*the last good checkpoint .* is kept"):
        main_mod.main(flags(tiny_data, tiny_models, tmp_path, "--max_iters", "6", "--eval_interval", "3"))
    assert damage(str(tmp_path / "ckpt.pt")) is None and load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 3
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-")) == ["ckpt-3.pt", "ckpt-3.pt.sha256"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(str(tmp_path / "ckpt.pt"))["model"].values()
               if v.is_floating_point())
