"""One run per out_dir: a new run never overwrites or mixes with another, and a resume continues the same run.

main.py calls open_run() before it writes anything: a new run is refused in an out_dir that holds one (unless
--overwrite, and then clear_run() removes only that run's files); a resume takes the newest intact checkpoint and
compares its flags with the run's (config.RESUME_MAY_CHANGE lists those that may differ). trim_metrics() drops
the metrics.jsonl rows a crash left behind after the checkpoint being resumed.
"""
import dataclasses
import json
import os
import shutil
import sys

from checkpoint import SHARDED_EXTRA, SUMS, checkpoint_history, load_checkpoint, newest_intact, sharded_checkpoint
from cli import UserError, write_text
from config import FIELDS, RESUME_MAY_CHANGE, TrainConfig

RUN_FILES = ("ckpt.pt", "best.pt", "results.json", "metrics.jsonl", "ckpt", "best")  # folders: --parallel fsdp


def run_files(out_dir: str) -> list:
    """The files of a main.py run in out_dir (checkpoints and their checksums, metrics, results)."""
    names = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
    names += [os.path.basename(p) for _, p in checkpoint_history(out_dir)]
    return names + [n + SUMS for n in names if os.path.exists(os.path.join(out_dir, n + SUMS))]


def check_new_run(cfg: TrainConfig):
    """A new run (or --eval_only) into an out_dir that holds another stops here, before anything is written."""
    found = [n for n in run_files(cfg.out_dir) if not n.endswith(SUMS)]
    if cfg.eval_only and [n for n in found if n != "results.json"]:  # even --overwrite: that run's results
        raise UserError(f"{cfg.out_dir} holds a training run ({', '.join(found[:4])}): --eval_only would replace "
                        f"its results.json; choose another --out_dir for the evaluation")
    if found and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''})"
                        f": continue it with --init_from resume, choose another --out_dir, or pass --overwrite True "
                        f"to replace it")


def clear_run(out_dir: str):
    """--overwrite: remove the previous run's files (nothing else in out_dir)."""
    for name in run_files(out_dir):
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def resume_changes(saved: dict, cfg: TrainConfig, ckpt_path: str) -> dict:
    """{flag: [old, new]} of the allowed changes; a change of any other flag stops with all of them named."""
    now = vars(cfg)
    changed = {k: [saved[k], now[k]] for k in now if k in saved and saved[k] != now[k]}
    changed.update({k: [None, now[k]] for k in now if k not in saved and now[k] != TrainConfig().__dict__[k]})
    refused = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        diffs = ", ".join(f"--{k} {new!r} (the run has {old!r})" for k, (old, new) in refused.items())
        raise UserError(f"--init_from resume with flags that change the run: {diffs}; resume with the run's values "
                        f"(its config is in {ckpt_path}), or start a new run from it: --init_from {ckpt_path} "
                        f"--out_dir NEW")
    return {k: v for k, v in changed.items() if k not in ("init_from", "config")}


def trim_metrics(path: str, iter_num: int) -> int:
    """Keep the rows of metrics.jsonl up to the resumed checkpoint's iteration (a crash after the checkpoint
    left rows the resumed run writes again). Rewritten atomically; returns the number of rows dropped."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                dropped += 1
                continue
            if row.get("iter", 0) > iter_num:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        write_text(path, "".join(keep))
    return dropped


def inherit(saved: dict, cfg: TrainConfig, explicit) -> TrainConfig:
    """The resumed run's config: its saved settings, except those the user set on this command line (or in its
    --config file), so that a bare `--init_from resume --out_dir X` continues the run as it was."""
    values = {k: v for k, v in saved.items() if k in FIELDS}
    values.update({k: getattr(cfg, k) for k in explicit if k in FIELDS})
    values["init_from"] = "resume"
    return dataclasses.replace(cfg, **values)


def open_run(cfg: TrainConfig, explicit=None, master=True):
    """(checkpoint path, checkpoint, allowed flag changes, the run's config) to resume, or (None, None, {}, cfg)
    for a new run into an out_dir that holds no other run. The newest intact checkpoint is resumed (a sharded
    folder under --parallel fsdp); damaged newer ones are named.

    explicit: the settings the user chose; the others are taken from the run (inherit). None: all of them."""
    if cfg.init_from != "resume":
        check_new_run(cfg)
        return None, None, {}, cfg
    folder = sharded_checkpoint(os.path.join(cfg.out_dir, "ckpt"))
    if folder is not None:
        path, ckpt, skipped = folder, load_checkpoint(os.path.join(folder, SHARDED_EXTRA)), []
    else:
        path, ckpt, skipped = newest_intact(cfg.out_dir)
    if path is None:
        if skipped:
            raise UserError(f"--init_from resume: no intact checkpoint in {cfg.out_dir} ({skipped[0][0]} "
                            f"{skipped[0][1]}): start again with --overwrite True")
        hint = " (or pass --overwrite True to start again)" if run_files(cfg.out_dir) else ""
        raise UserError(f"--init_from resume but {os.path.join(cfg.out_dir, 'ckpt.pt')} does not exist: check "
                        f"--out_dir{hint}")
    if "scaler" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is a model-only checkpoint (best.pt, prune.py or nanoGPT) and cannot be resumed: "
                        f"start a run from its weights with --init_from {path} --out_dir NEW")
    for bad, problem in skipped:
        if master:
            print(f"warning: {bad} {problem}; resuming from {path} (iter {ckpt['iter_num']}), the newest intact "
                  f"checkpoint", file=sys.stderr)
    if explicit is not None:
        cfg = inherit(ckpt["config"], cfg, explicit)
    return path, ckpt, resume_changes(ckpt["config"], cfg, path), cfg
