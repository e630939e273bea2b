"""The paper's experiment at small scale, offline on a CPU: one command from raw text to the results table.

    python demo.py                      # default preset, about 12 minutes on 2 CPU cores (README, "Demo")
    python demo.py --preset full        # a larger teacher and budget (see README for its time)
    python demo.py --preset tiny        # a seconds-long smoke run (used by the tests)

No pretrained GPT-2 exists offline, so the demo pretrains its own small dense GPT-2 teacher with main.py,
exports it as a Hugging Face folder, and then runs every method from that folder at equal token budgets.
Every stage is a public command (printed before it runs); a finished stage is skipped on the next run and an
interrupted training stage resumes from its checkpoint.
"""
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import cli
from cli import UserError

HERE = os.path.dirname(os.path.abspath(__file__))

# --zeroshot is off by default (README, Demo, zero-shot): measured on the default preset's models, the first 500
# examples per task take about 45 s per model (10 models: + 8 min, past the budget), and the pretrained teacher
# scores no better than the same network at random initialisation (mean acc 31.8 vs 32.5, ± about 1).
ZEROSHOT_DEFAULT = False
ZS_LIMIT_DEFAULT = 500
# teacher: its shape and pretraining; retrain: the budget every trained method gets (same for all of them).
PRESETS = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, teacher_iters=6, teacher_lr=3e-3,
                 retrain_iters=4, retrain_lr=1e-3, eval_interval=4, eval_iters=2, ppl_windows=4, calib=8,
                 threads=1, zeroshot_limit=2),
    # Sized on the 2-core development CPU (README, "Demo", sizing table). The lm_head over GPT-2's 50257 tokens
    # costs the same whatever the blocks are, so a narrow teacher with several blocks is the cheap way to make the
    # blocks matter: after 1.5M tokens one-shot 2:4 magnitude pruning costs 8 x 32 blocks 56 % in perplexity,
    # 12 x 32 34 %, 4 x 32 29 %, 4 x 64 16 %; 12 x 32 after 0.5M tokens only 14 %.
    "default": dict(n_layer=8, n_head=4, n_embd=32, block_size=128, batch_size=8, teacher_iters=1500,
                    teacher_lr=5e-3, retrain_iters=100, retrain_lr=1e-3, eval_interval=50, eval_iters=10,
                    ppl_windows=200, calib=32, threads=2, zeroshot_limit=ZS_LIMIT_DEFAULT),
    # The same recipe with twice the pretraining, four times the retraining and the full WikiText-2 test set.
    "full": dict(n_layer=8, n_head=4, n_embd=32, block_size=128, batch_size=8, teacher_iters=3000,
                 teacher_lr=5e-3, retrain_iters=400, retrain_lr=1e-3, eval_interval=200, eval_iters=40,
                 ppl_windows=0, calib=64, threads=2, zeroshot_limit=0),
}

# method -> (training?, main.py / prune.py flags). All trained sparse methods start from the teacher's weights.
DISTILL = ["--distill_model", "True", "--hardness_task", "0.33", "--hardness_kldiv", "0.67"]
METHODS = {
    "dense_continued": ("train", ["--mode", "dense"]),
    "oneshot_magnitude": ("prune", ["--method", "magnitude"]),
    "oneshot_wanda": ("prune", ["--method", "wanda"]),
    # local reconstruction at 3e-3: of 1e-4, 1e-3, 3e-3 (10 epochs) and 1e-3 (20 epochs), the best C4 validation
    # loss on this teacher over 5 calibration seeds (README, "One-shot baselines on every family")
    "oneshot_wanda_recon": ("prune", ["--method", "wanda", "--reconstruct", "True", "--recon_lr", "3e-3",
                                      "--seed", "{seed}"]),
    "oneshot_sparsegpt": ("prune", ["--method", "sparsegpt"]),
    "naive_retrain": ("train", ["--change_mask", "False", "--srste_decay", "0"]),
    "gmp": ("train", ["--prune_schedule", "gradual", "--prune_start", "0", "--prune_end", "{prune_end}",
                      *DISTILL]),
    "imp": ("train", ["--prune_schedule", "iterative", "--prune_start", "0", "--prune_end", "{prune_end}",
                      "--prune_rounds", "3", *DISTILL]),
    "ast_naive": ("train", ["--change_mask", "True", "--srste_decay", "2e-4", "--increase_step", "{ramp}",
                            *DISTILL]),
    "ast_boosted": ("train", ["--change_mask", "True", "--srste_decay", "2e-4", "--increase_step", "{ramp}",
                              "--SLoRB", "True", "--SLoRB_k", "16", "--SLoRB_init_type", "mean",
                              "--trainable_projection", "True", *DISTILL]),
}
LABELS = {"teacher": "Dense teacher (start)", "dense_continued": "Dense, continued (control)",
          "oneshot_magnitude": "One-shot magnitude", "oneshot_wanda": "One-shot Wanda",
          "oneshot_wanda_recon": "One-shot Wanda + local reconstruction",
          "oneshot_sparsegpt": "One-shot SparseGPT", "naive_retrain": "Naive retraining (fixed mask)",
          "gmp": "Gradual magnitude pruning", "imp": "Iterative magnitude pruning", "ast_naive": "AST-Naive",
          "ast_boosted": "AST-Boosted (SLoRB k=16)"}


class Demo:
    def __init__(self, args):
        self.args, self.p = args, dict(PRESETS[args.preset])
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or key not in self.p:
                raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(self.p)}")
            try:
                self.p[key] = type(self.p[key])(value)
            except ValueError:
                raise UserError(f"--set {item!r}: {value!r} is not a {type(self.p[key]).__name__}") from None
        if args.threads:
            self.p["threads"] = args.threads
        self.out = os.path.abspath(args.out_dir)
        self.data = os.path.join(self.out, "data")
        self.timings_path = os.path.join(self.out, "stage_seconds.json")
        self.timings = json.load(open(self.timings_path)) if os.path.isfile(self.timings_path) else {}

    # ------------------------------------------------------------------ running public commands
    def stage(self, name, cmd, done):
        """Run cmd unless `done` exists; print it; tee its output to logs/NAME.log; record its wall time."""
        if os.path.exists(done):
            print(f"[{name}] done already ({os.path.relpath(done, self.out)}), skipped")
            return
        print(f"\n[{name}] $ {shlex.join(cmd)}", flush=True)
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.p["threads"])}
        t0 = time.time()
        with open(os.path.join(self.out, "logs", f"{name}.log"), "a") as log:
            proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            for line in proc.stdout:
                log.write(line)
                if not self.args.quiet:
                    print("   " + line, end="", flush=True)
            code = proc.wait()
        if code == cli.EXIT_INTERRUPTED:  # main.py stopped by a signal: it saved its checkpoint
            raise UserError(f"stage {name} was interrupted (its checkpoint is saved); rerun demo.py to continue it")
        if code != 0:
            raise UserError(f"stage {name} failed (exit {code}); see {self.out}/logs/{name}.log, fix it and rerun "
                            f"demo.py (finished stages are kept)")
        if not os.path.exists(done):  # e.g. main.py stopped by a signal: it saved a checkpoint and exited cleanly
            raise UserError(f"stage {name} stopped before finishing; rerun demo.py to continue it")
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
        with open(self.timings_path, "w") as f:
            json.dump(self.timings, f, indent=2)

    def py(self, script, *args):
        return [sys.executable, os.path.join(HERE, script), *map(str, args)]

    def common_eval(self):
        p = self.p
        return ["--wikitext_dir", f"{self.data}/wikitext", "--data_dir", f"{self.data}/c4",
                "--ppl_windows", p["ppl_windows"], "--eval_iters", p["eval_iters"], "--batch_size", p["batch_size"]]

    def train_flags(self, iters, lr, out_dir, eval_interval=None):
        p = self.p
        return ["--out_dir", out_dir, "--seed", self.args.seed, "--block_size", p["block_size"],
                "--batch_size", p["batch_size"], "--global_batch_size", p["batch_size"], "--max_iters", iters,
                "--learning_rate", lr, "--min_lr", lr / 10, "--warmup_iters", max(iters // 10, 1),
                "--lr_decay_iters", iters, "--lr_tail", "hold", "--eval_interval", eval_interval or p["eval_interval"],
                "--log_interval", max((eval_interval or p["eval_interval"]) // 2, 1), "--progress", "False",
                "--num_threads", p["threads"], "--device", "cpu", "--mask_update_interval", 5,
                *self.common_eval()]

    # ------------------------------------------------------------------ the pipeline
    def find_inputs(self):
        root = self.args.data_root
        train = sorted(glob.glob(f"{root}/webtext/*.json.gz") + glob.glob(f"{root}/fineweb/*.json.gz")
                       + glob.glob(f"{root}/c4/en/*train*.json.gz") + glob.glob(f"{root}/c4/en/*validation.sample*"))
        val = sorted(glob.glob(f"{root}/c4/en/c4-validation.00000-of-00008*.json.gz"))
        wiki = os.path.join(root, "wikitext2")
        if not train or not val or not os.path.isdir(wiki):
            raise UserError(f"no web text / C4 validation / wikitext2 under {root}: pass --data_root (or set "
                            f"{cli.DATA_ENV}); with network, `python data/c4_dataset/prepare.py --download 1` and "
                            f"`python data/wikitext/prepare.py --download` fetch real data")
        return train, val, wiki

    def prepare_data(self):
        train, val, wiki = self.find_inputs()
        self.stage("data_c4", self.py("data/c4_dataset/prepare.py", *sum((["--input", f] for f in train), []),
                                      *sum((["--val_files", f] for f in val), []), "--out_dir", f"{self.data}/c4",
                                      "--force"), f"{self.data}/c4/meta.json")
        self.stage("data_wikitext", self.py("data/wikitext/prepare.py", "--input", wiki, "--out_dir",
                                            f"{self.data}/wikitext", "--force"), f"{self.data}/wikitext/meta.json")
        c4_train = [f for f in train if "/c4/" in f]
        self.stage("data_calibration", self.py("prepare_calibration_data.py", "--input", *c4_train, "--out",
                                               f"{self.data}/calibration.pt", "--nsamples", self.p["calib"],
                                               "--seqlen", self.p["block_size"], "--seed", self.args.seed, "--force"),
                   f"{self.data}/calibration.pt")

    def pretrain_teacher(self):
        p, d = self.p, os.path.join(self.out, "teacher")
        cmd = self.py("main.py", *self.init_flags(d, "scratch"), "--mode", "dense",
                      "--n_layer", p["n_layer"], "--n_head", p["n_head"], "--n_embd", p["n_embd"],
                      *self.train_flags(p["teacher_iters"], p["teacher_lr"], d, max(p["teacher_iters"] // 4, 1)))
        self.stage("teacher", cmd, f"{d}/results.json")
        hf = os.path.join(self.out, "teacher_hf")
        self.stage("teacher_export", self.py("export.py", "--checkpoint", f"{d}/ckpt.pt", "--out", hf, "--force"),
                   f"{hf}/config.json")
        self.stage("teacher_eval", self.py("evaluate.py", "--model", hf, "--block_size", p["block_size"],
                                           *self.common_eval(), "--out", f"{self.out}/teacher_eval.json"),
                   f"{self.out}/teacher_eval.json")
        return hf

    def init_flags(self, run_dir, fresh):
        """An interrupted main.py stage continues from its checkpoint; one stopped before its first checkpoint
        starts again (--overwrite: the folder holds only that attempt's leftovers)."""
        done = os.path.isfile(f"{run_dir}/results.json")
        if os.path.isfile(f"{run_dir}/ckpt.pt") and not done:
            return ["--init_from", "resume"]
        return ["--init_from", fresh, "--overwrite", "True"]

    def run_methods(self, teacher):
        p = self.p
        iters = p["retrain_iters"]
        fill = {"prune_end": max(2 * iters // 3, 1), "ramp": max(iters // 4, 1), "seed": self.args.seed}
        for name, (kind, flags) in METHODS.items():
            flags = [f.format(**fill) for f in flags]
            d = os.path.join(self.out, name)
            if kind == "prune":
                self.prune(name, flags, teacher)
            else:
                cmd = self.py("main.py", "--student_model", teacher, "--teacher_model", teacher,
                              *self.init_flags(d, ""), *flags,
                              *self.train_flags(iters, p["retrain_lr"], d))
                self.stage(name, cmd, f"{d}/results.json")

    def prune(self, name, flags, teacher):
        d = os.path.join(self.out, name)
        self.stage(name, self.py("prune.py", "--model", teacher, *flags, "--calibration", f"{self.data}/calibration.pt",
                                 "--block_size", self.p["block_size"], "--num_threads", self.p["threads"],
                                 "--out", f"{d}/model.pt", *self.common_eval(), "--results", f"{d}/results.json"),
                   f"{d}/results.json")
        return d

    def zeroshot(self, teacher):
        """--zeroshot: every method's final model through zeroshot.py (the first zeroshot_limit examples of each
        of the seven tasks; 0 = all), as the paper's second table with chance level and each stage's time."""
        from results import ZEROSHOT_COLUMNS

        limit = self.p["zeroshot_limit"]
        runs = {}
        for key in ["teacher", *METHODS]:
            model = teacher if key == "teacher" else \
                f"{self.out}/{key}/{'model.pt' if METHODS[key][0] == 'prune' else 'ckpt.pt'}"
            out = f"{self.out}/{key}_zeroshot.json" if key == "teacher" else f"{self.out}/{key}/zeroshot.json"
            self.stage(f"zeroshot_{key}", self.py("zeroshot.py", "--model", model, "--limit", limit, "--device", "cpu",
                                                  "--num_threads", self.p["threads"], "--out", out), out)
            with open(out) as f:
                runs[key] = json.load(f)["zeroshot"]
        tasks = runs["teacher"]["tasks"]
        columns = [(k, f"{c}{'*' if tasks[k]['approximate'] else ''} (chance {100 * tasks[k]['chance']:.1f})")
                   for k, c in ZEROSHOT_COLUMNS]
        lines = [f"Zero-shot acc in % ± the harness's standard error, 0-shot, {runs['teacher']['harness']}, on "
                 + (f"the first {limit} examples of each task" if limit else "the full splits")
                 + "; chance = a uniform guess among each example's choices.", "",
                 "| Method | " + " | ".join(c for _, c in columns) + " | Mean | zero-shot time |",
                 "|---" * (len(columns) + 3) + "|"]
        for key, z in runs.items():
            rows = [z["tasks"][k] for k, _ in columns]
            cells = [f"{100 * t['acc']:.1f}" + (f" ± {100 * t['acc_stderr']:.1f}" if t["acc_stderr"] else "")
                     for t in rows]
            lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + f" | {100 * z['mean_acc']:.1f} | "
                         f"{self.timings.get(f'zeroshot_{key}', 0):.0f} s |")
        if any(t["approximate"] for t in tasks.values()):
            lines += ["", "* HellaSwag from the approximate fallback file (see zeroshot.py), not harness-exact."]
        md = "\n".join(lines)
        with open(f"{self.out}/results.md", "a") as f:
            f.write("\n" + md + "\n")
        print("\n" + md)
        return {key: z["tasks"] for key, z in runs.items()}

    def gap_only(self, teacher):
        d = self.prune("oneshot_magnitude", METHODS["oneshot_magnitude"][1], teacher)
        dense = json.load(open(f"{self.out}/teacher_eval.json"))["wikitext_ppl"]
        pruned = json.load(open(f"{d}/results.json"))["wikitext_ppl"]
        settings = " ".join(f"{k}={v}" for k, v in self.p.items())
        print(f"\n{settings}\nteacher WikiText-2 ppl {dense:.2f}, one-shot 2:4 magnitude {pruned:.2f}: gap "
              f"{100 * (pruned / dense - 1):.1f} %; teacher pretraining {self.timings.get('teacher', 0):.0f} s")
        return {"teacher_ppl": dense, "oneshot_ppl": pruned, "gap": pruned / dense - 1}

    # ------------------------------------------------------------------ the table
    def table(self):
        import plot
        from results import collect

        runs = [("teacher", f"{self.out}/teacher_eval.json")] + [(m, f"{self.out}/{m}/results.json") for m in METHODS]
        rows = collect([(name, path) for name, path in runs], [])
        by = {r["method"]: r for r in rows}
        ppl = {k: r["wikitext_ppl"] for k, r in by.items()}
        control, teacher, oneshot = ppl["dense_continued"], ppl["teacher"], ppl["oneshot_magnitude"]
        out = []
        for key, r in by.items():
            sparse = key not in ("teacher", "dense_continued")
            gap = oneshot - teacher
            out.append({
                "key": key, "method": LABELS[key], "training": r["training"], "wikitext_ppl": r["wikitext_ppl"],
                "ppl_vs_control": r["wikitext_ppl"] / control, "ppl_vs_teacher": r["wikitext_ppl"] / teacher,
                "gap_recovered": (oneshot - r["wikitext_ppl"]) / gap if sparse and gap > 0 else None,
                "val_loss": r["val_loss"], "tokens": r["tokens_raw"] or 0, "wall_seconds": self.timings.get(key),
                "nm_ok": r["nm_ok"], "mean_sparsity": r["mean_sparsity"],
            })
        summary = {"preset": self.args.preset, "seed": self.args.seed, "settings": self.p,
                   "ppl_windows": self.p["ppl_windows"], "oneshot_magnitude_gap": oneshot / teacher - 1,
                   "total_stage_seconds": sum(self.timings.values()), "rows": out}
        md = markdown(summary)
        with open(f"{self.out}/results.md", "w") as f:
            f.write(md + "\n")
        with open(f"{self.out}/results.json", "w") as f:
            json.dump(summary, f, indent=2)
        trained = [m for m, (kind, _) in METHODS.items() if kind == "train"]
        plot.plot_runs([f"{self.out}/{m}" for m in trained], f"{self.out}/curves.png",
                       panels=[("val_loss", "C4 val loss (student CE)"), ("wikitext_ppl", "WikiText-2 ppl"),
                               ("flip_ratio", "mask flip ratio")], labels=[LABELS[m] for m in trained])
        print("\n" + md)
        print(f"\nwrote {self.out}/results.md, results.json and curves.png")
        return summary


def markdown(summary):
    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    windows = summary["ppl_windows"]
    lines = [f"Preset `{summary['preset']}`, seed {summary['seed']}; WikiText-2 perplexity on "
             f"{'the full test set' if not windows else f'the first {windows} windows'} of "
             f"{summary['settings']['block_size']} tokens. One-shot 2:4 magnitude pruning costs "
             f"{100 * summary['oneshot_magnitude_gap']:.1f} % perplexity against the teacher.", "",
             "| Method | Training | WikiText-2 ppl | ppl / dense control | ppl / teacher | one-shot gap recovered "
             "| C4 val loss | tokens | wall time | 2:4 check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        check = "dense" if r["nm_ok"] is None else ("2:4 ✓" if r["nm_ok"] else "✗ NOT 2:4")
        wall = "–" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f} s"
        gap = "–" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.1f} %"
        lines.append(f"| {r['method']} | {r['training']} | {num(r['wikitext_ppl'], '.2f')} | "
                     f"{num(r['ppl_vs_control'], '.3f')} | {num(r['ppl_vs_teacher'], '.3f')} | {gap} | "
                     f"{num(r['val_loss'], '.4f')} | {r['tokens']:,} | {wall} | {check} |")
    return "\n".join(lines)


def main(argv=None):
    p = cli.ArgumentParser(prog="demo.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="default: about 12 min on 2 CPU cores; full: 2x pretraining, 4x retraining, the whole "
                        "WikiText-2 test set (roughly an hour, estimated, not measured); tiny: seconds, for tests")
    p.add_argument("--out_dir", default="out/demo", help="everything goes here; rerunning reuses finished stages")
    p.add_argument("--data_root", default=cli.default_data_root(),
                   help=f"raw data folder (default ${cli.DATA_ENV} or ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per stage (0 = the preset's)")
    p.add_argument("--quiet", action="store_true", help="only print the commands and the table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one preset setting, e.g. --set n_layer=4 (repeatable; for sizing studies)")
    p.add_argument("--gap_only", action="store_true",
                   help="stop after the teacher and one-shot 2:4 magnitude pruning; print the perplexity gap")
    p.add_argument("--zeroshot", type=cli.parse_bool, default=ZEROSHOT_DEFAULT,
                   help="also the zero-shot table (zeroshot.py on every method's model; README, Demo)")
    args = p.parse_args(argv)
    t0 = time.time()
    demo = Demo(args)
    os.makedirs(demo.out, exist_ok=True)
    demo.prepare_data()
    teacher = demo.pretrain_teacher()
    if args.gap_only:
        return demo.gap_only(teacher)
    demo.run_methods(teacher)
    summary = demo.table()
    if args.zeroshot:
        summary["zeroshot"] = demo.zeroshot(teacher)
        with open(f"{demo.out}/results.json", "w") as f:
            json.dump(summary, f, indent=2)
    print(f"demo finished in {time.time() - t0:.0f} s (this invocation)")
    return summary


if __name__ == "__main__":
    try:
        cli.run(main)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same demo.py command to continue (finished stages are kept)", file=sys.stderr)
        sys.exit(130)
