"""One run per out_dir: a new run never overwrites or mixes with another, and a resume continues the same run.

main.py calls these before it writes anything: check_new_run() refuses an out_dir that holds a run (unless
--overwrite, and then clear_run() removes only that run's files), resume_changes() compares a resume's flags
with the checkpoint's (config.RESUME_MAY_CHANGE lists those that may differ), and trim_metrics() drops the
metrics.jsonl rows a crash left behind after the checkpoint being resumed.
"""
import json
import os

from checkpoint import SUMS, checkpoint_history
from cli import UserError
from config import RESUME_MAY_CHANGE, TrainConfig

RUN_FILES = ("ckpt.pt", "best.pt", "results.json", "metrics.jsonl")


def run_files(out_dir: str) -> list:
    """The files of a main.py run in out_dir (checkpoints and their checksums, metrics, results)."""
    names = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
    names += [os.path.basename(p) for _, p in checkpoint_history(out_dir)]
    return names + [n + SUMS for n in names if os.path.exists(os.path.join(out_dir, n + SUMS))]


def check_new_run(cfg: TrainConfig):
    """A new run (or --eval_only) into an out_dir that holds another stops here, before anything is written."""
    found = [n for n in run_files(cfg.out_dir) if not n.endswith(SUMS)]
    if found and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''})"
                        f": continue it with --init_from resume, choose another --out_dir, or pass --overwrite True "
                        f"to replace it")


def clear_run(out_dir: str):
    """--overwrite: remove the previous run's files (nothing else in out_dir)."""
    for name in run_files(out_dir):
        os.remove(os.path.join(out_dir, name))


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
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
