"""The paper's experiment at small scale, offline on a CPU: one command from raw text to the results table.

    python demo.py                      # default preset: teacher, every method for 3 seeds (README, "Demo")
    python demo.py --seeds 5            # more seeds for the retraining methods, from the same teacher
    python demo.py --preset full        # a larger teacher and budget (see README)
    python demo.py --preset tiny        # a seconds-long smoke run (used by the tests)

No pretrained GPT-2 exists offline, so the demo pretrains its own small dense GPT-2 teacher with main.py,
exports it as a Hugging Face folder, and then runs every method from that folder at equal token budgets: the
one-shot baselines once, every retraining method once per seed (the seed sets its data order), and reports each
method's mean and spread over the seeds and the paired differences the paper's claims rest on.
Every stage is a public command (printed before it runs, written at the top of its log); a finished stage is
skipped on the next run and an interrupted training stage resumes from its checkpoint.

Threads: every stage runs with --threads torch threads (default 1) and independent stages run --jobs at a time
(default: one per CPU). Two threads of one process busy-wait on each other when another program holds a core,
which made stages several times slower; one-thread processes only share the CPUs (README, "Demo").
"""
import concurrent.futures
import glob
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time

import cli
from cli import UserError

HERE = os.path.dirname(os.path.abspath(__file__))

# --zeroshot is off by default (README, Demo, zero-shot): measured on the default preset's models, the first 500
# examples per task take about 45 s per model (10 models: + 8 min, past the budget), and the pretrained teacher
# scores no better than the same network at random initialisation (mean acc 31.8 vs 32.5, ± about 1).
ZEROSHOT_DEFAULT = False
ZEROSHOT_LIMIT = {"tiny": 2, "default": 500, "full": 0}  # examples per task (0 = the full splits)

# teacher: its shape and pretraining; retrain: the budget every trained method gets (same for all of them, per
# seed). eval_interval / curve_*: the cheap evaluations drawn as curves; eval_iters / ppl_windows: the final one,
# which the table reports (C4 validation batches of batch_size x block_size, WikiText-2 windows of block_size).
PRESETS = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, teacher_iters=6, teacher_lr=3e-3,
                 retrain_iters=4, retrain_lr=1e-3, eval_interval=2, curve_eval_iters=1, curve_ppl_windows=2,
                 eval_iters=2, ppl_windows=4, calib=8, teacher_ranks=1),
    # Sized on the 2-core development CPU (README, "Demo", sizing table). The lm_head over GPT-2's 50257 tokens
    # costs the same whatever the blocks are, so a narrow teacher with several blocks is the cheap way to make the
    # blocks matter: after 1.5M tokens one-shot 2:4 magnitude pruning costs 8 x 32 blocks 56 % in perplexity,
    # 12 x 32 34 %, 4 x 32 29 %, 4 x 64 16 %; 12 x 32 after 0.5M tokens only 14 %.
    "default": dict(n_layer=8, n_head=4, n_embd=32, block_size=128, batch_size=8, teacher_iters=1500,
                    teacher_lr=5e-3, retrain_iters=60, retrain_lr=1e-3, eval_interval=5, curve_eval_iters=2,
                    curve_ppl_windows=8, eval_iters=10, ppl_windows=200, calib=32, teacher_ranks=2),
    # The same recipe with twice the pretraining, four times the retraining and the full WikiText-2 test set.
    "full": dict(n_layer=8, n_head=4, n_embd=32, block_size=128, batch_size=8, teacher_iters=3000,
                 teacher_lr=5e-3, retrain_iters=400, retrain_lr=1e-3, eval_interval=20, curve_eval_iters=4,
                 curve_ppl_windows=32, eval_iters=40, ppl_windows=0, calib=64, teacher_ranks=2),
}

# method -> (kind, main.py / prune.py flags). "prune": one-shot, run once (deterministic given the calibration
# windows); "train": retrained once per seed. All trained sparse methods start from the teacher's weights.
DISTILL = ["--distill_model", "True", "--hardness_task", "0.33", "--hardness_kldiv", "0.67",
           "--hardness_squarehead", "0"]
# The demo's table was made with torch's AdamW for the runs without SR-STE (main.py's choice before --optimizer
# alone chose it) and nanoGPT's warm-up (lr (it+1)/(warmup+1)): the demo names both, so its table stays the same.
PLAIN_ADAMW = ["--optimizer", "adamw", "--srste_decay", "0"]
METHODS = {
    "dense_continued": ("train", ["--mode", "dense", *PLAIN_ADAMW]),
    "oneshot_magnitude": ("prune", ["--method", "magnitude"]),
    "oneshot_wanda": ("prune", ["--method", "wanda"]),
    # local reconstruction at 3e-3: of 1e-4, 1e-3, 3e-3 (10 epochs) and 1e-3 (20 epochs), the best C4 validation
    # loss on this teacher over 5 calibration seeds (README, "One-shot baselines on every family")
    "oneshot_wanda_recon": ("prune", ["--method", "wanda", "--reconstruct", "True", "--recon_lr", "3e-3",
                                      "--seed", "{seed}"]),
    "oneshot_sparsegpt": ("prune", ["--method", "sparsegpt"]),
    "naive_retrain": ("train", ["--change_mask", "False", *PLAIN_ADAMW]),
    "gmp": ("train", ["--prune_schedule", "gradual", "--prune_start", "0", "--prune_end", "{prune_end}",
                      *PLAIN_ADAMW, *DISTILL]),
    "imp": ("train", ["--prune_schedule", "iterative", "--prune_start", "0", "--prune_end", "{prune_end}",
                      "--prune_rounds", "3", *PLAIN_ADAMW, *DISTILL]),
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
# The paper's claims, as (A, B) pairs: is A better than B, paired seed by seed, beyond the seed-to-seed spread?
COMPARISONS = [("ast_boosted", "ast_naive"), ("ast_naive", "naive_retrain"), ("ast_boosted", "naive_retrain"),
               ("ast_naive", "gmp"), ("ast_naive", "imp"), ("naive_retrain", "oneshot_sparsegpt"),
               ("oneshot_sparsegpt", "oneshot_magnitude"), ("oneshot_wanda_recon", "oneshot_wanda"),
               ("ast_boosted", "oneshot_wanda_recon"), ("ast_boosted", "dense_continued")]
# sample.py on one prompt: the teacher, the one-shot model and AST-Boosted (its first seed)
SAMPLES = dict(prompt="The city council said on Monday that", num_samples=2, max_new_tokens=30, temperature=0.8,
               top_k=50, seed=0)
SAMPLE_MODELS = [("teacher", "Dense teacher"), ("oneshot_magnitude", "One-shot magnitude"),
                 ("ast_boosted", "AST-Boosted")]


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
        if args.seeds < 1 or args.threads < 1 or args.jobs < 0:
            raise UserError("--seeds and --threads must be at least 1, --jobs at least 0 (0 = one per CPU)")
        self.threads, self.jobs = args.threads, args.jobs or cpu_count()
        self.seeds = [args.seed + i for i in range(args.seeds)]
        self.out = os.path.abspath(args.out_dir)
        self.data = os.path.join(self.out, "data")
        self.timings_path = os.path.join(self.out, "stage_seconds.json")
        self.timings = json.load(open(self.timings_path)) if os.path.isfile(self.timings_path) else {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ running public commands
    def stage(self, name, cmd, done):
        """Run cmd unless `done` exists; print it; log its output to logs/NAME.log (the command and the demo's
        settings first); record its wall time. Safe to call from several threads at once."""
        if os.path.exists(done):
            self.say(f"[{name}] done already ({os.path.relpath(done, self.out)}), skipped")
            return
        self.say(f"\n[{name}] $ {shlex.join(cmd)}")
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads), "TQDM_DISABLE": "1"}
        prefix = f"   [{name}] " if self.jobs > 1 else "   "
        t0 = time.time()
        with open(os.path.join(self.out, "logs", f"{name}.log"), "a", buffering=1) as log:  # lines, for tail -f
            log.write(f"$ {shlex.join(cmd)}\n# cwd {HERE}; OMP_NUM_THREADS={self.threads}; started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# demo.py preset {self.args.preset}, seeds "
                      f"{self.seeds}, settings {json.dumps(self.p)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            for line in proc.stdout:
                log.write(line)
                if not self.args.quiet:
                    self.say(prefix + line.rstrip("\n"))
            code = proc.wait()
        if code == cli.EXIT_INTERRUPTED:  # main.py stopped by a signal: it saved its checkpoint
            raise UserError(f"stage {name} was interrupted (its checkpoint is saved); rerun demo.py to continue it")
        if code != 0:
            raise UserError(f"stage {name} failed (exit {code}); see {self.out}/logs/{name}.log, fix it and rerun "
                            f"demo.py (finished stages are kept)")
        if not os.path.exists(done):  # e.g. main.py stopped by a signal: it saved a checkpoint and exited cleanly
            raise UserError(f"stage {name} stopped before finishing; rerun demo.py to continue it")
        with self.lock:
            self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
            cli.write_json(self.timings_path, self.timings)

    def say(self, text):
        with self.lock:
            print(text, flush=True)

    def parallel(self, jobs):
        """Run the jobs (functions) --jobs at a time. After a failure no new job starts; the running ones finish
        (their stages stay reusable) and the first failure is raised."""
        if self.jobs == 1:
            for job in jobs:
                job()
            return
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(job) for job in jobs]
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            for f in futures:
                f.cancel()  # only those not started yet
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            raise errors[0]

    def py(self, script, *args):
        return [sys.executable, os.path.join(HERE, script), *map(str, args)]

    def data_flags(self):
        return ["--wikitext_dir", f"{self.data}/wikitext", "--data_dir", f"{self.data}/c4"]

    def final_eval(self):
        """The evaluation the table reports, the same for every row."""
        p = self.p
        return [*self.data_flags(), "--ppl_windows", p["ppl_windows"], "--eval_iters", p["eval_iters"],
                "--batch_size", p["batch_size"], "--num_threads", self.threads]

    def train_flags(self, iters, lr, out_dir, seed, eval_interval=None, ranks=1):
        p = self.p
        every = eval_interval or p["eval_interval"]
        return ["--out_dir", out_dir, "--seed", seed, "--block_size", p["block_size"],
                "--batch_size", p["batch_size"] // ranks, "--global_batch_size", p["batch_size"], "--max_iters", iters,
                "--learning_rate", lr, "--min_lr", lr / 10, "--warmup_iters", max(iters // 10, 1),
                "--lr_decay_iters", iters, "--lr_tail", "hold", "--lr_warmup", "nanogpt",
                "--eval_interval", every,
                "--log_interval", max(every // 2, 1), "--progress", "False", "--num_threads", self.threads,
                "--device", "cpu", "--mask_update_interval", 5, *self.data_flags(),
                "--eval_iters", p["curve_eval_iters"], "--ppl_windows", p["curve_ppl_windows"],
                "--final_eval_iters", p["eval_iters"], "--final_ppl_windows", p["ppl_windows"]]

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
        c4_train = [f for f in train if "/c4/" in f]
        self.parallel([
            lambda: self.stage("data_c4", self.py("data/c4_dataset/prepare.py", *sum((["--input", f] for f in train),
                                                                                     []),
                                                  *sum((["--val_files", f] for f in val), []), "--out_dir",
                                                  f"{self.data}/c4", "--force"), f"{self.data}/c4/meta.json"),
            lambda: self.stage("data_wikitext", self.py("data/wikitext/prepare.py", "--input", wiki, "--out_dir",
                                                        f"{self.data}/wikitext", "--force"),
                               f"{self.data}/wikitext/meta.json"),
            lambda: self.stage("data_calibration", self.py("prepare_calibration_data.py", "--input", *c4_train,
                                                           "--out", f"{self.data}/calibration.pt", "--nsamples",
                                                           self.p["calib"], "--seqlen", self.p["block_size"],
                                                           "--seed", self.args.seed, "--force"),
                               f"{self.data}/calibration.pt")])

    def pretrain_teacher(self):
        """main.py from scratch; with teacher_ranks > 1 as that many one-thread DDP ranks (torchrun), the
        teacher being the one stage nothing else can run beside. The rank count is the preset's, never the
        machine's: the same preset gives the same teacher on every machine of a CPU type."""
        p, d = self.p, os.path.join(self.out, "teacher")
        ranks = p["teacher_ranks"]
        if ranks < 1 or p["batch_size"] % ranks:
            raise UserError(f"teacher_ranks {ranks} must be at least 1 and divide batch_size {p['batch_size']}")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
            if ranks > 1 else [sys.executable]
        cmd = [*launch, os.path.join(HERE, "main.py"), *map(str, [
            *self.init_flags(d, "scratch"), "--mode", "dense", *PLAIN_ADAMW, "--n_layer", p["n_layer"],
            "--n_head", p["n_head"], "--n_embd", p["n_embd"],
            *self.train_flags(p["teacher_iters"], p["teacher_lr"], d, self.args.seed,
                              max(p["teacher_iters"] // 10, 1), ranks)])]
        self.stage("teacher", cmd, f"{d}/results.json")
        hf = os.path.join(self.out, "teacher_hf")
        self.stage("teacher_export", self.py("export.py", "--checkpoint", f"{d}/ckpt.pt", "--out", hf, "--force"),
                   f"{hf}/config.json")
        self.stage("teacher_eval", self.py("evaluate.py", "--model", hf, "--eval_block_size", p["block_size"],
                                           *self.final_eval(), "--out", f"{self.out}/teacher_eval.json"),
                   f"{self.out}/teacher_eval.json")
        return hf

    def init_flags(self, run_dir, fresh):
        """An interrupted main.py stage continues from its checkpoint; one stopped before its first checkpoint
        starts again (--overwrite: the folder holds only that attempt's leftovers)."""
        done = os.path.isfile(f"{run_dir}/results.json")
        if os.path.isfile(f"{run_dir}/ckpt.pt") and not done:
            return ["--init_from", "resume"]
        return ["--init_from", fresh, "--overwrite", "True"]

    def run_dir(self, name, seed=None):
        return os.path.join(self.out, name) if seed is None else os.path.join(self.out, name, f"seed{seed}")

    def runs(self, name):
        """(seed or None, folder) of every run of a method: one-shot methods once, trained ones per seed."""
        if METHODS[name][0] == "prune":
            return [(None, self.run_dir(name))]
        return [(seed, self.run_dir(name, seed)) for seed in self.seeds]

    def run_methods(self, teacher):
        """Every (method, seed) run, --jobs at a time; the longest (distilled) runs are started first."""
        p = self.p
        iters = p["retrain_iters"]
        fill = {"prune_end": max(2 * iters // 3, 1), "ramp": max(iters // 4, 1), "seed": self.args.seed}
        jobs = []
        for name, (kind, flags) in METHODS.items():
            flags = [f.format(**fill) for f in flags]
            if kind == "prune":
                jobs.append((0, lambda name=name, flags=flags: self.curve_reference(
                    name, f"{self.prune(name, flags, teacher)}/model.pt")))
                continue
            for seed, d in self.runs(name):
                cmd = self.py("main.py", "--student_model", teacher, "--teacher_model", teacher,
                              *self.init_flags(d, ""), *flags,
                              *self.train_flags(iters, p["retrain_lr"], d, seed))
                cost = 2 if "--distill_model" in flags else 1
                jobs.append((cost, lambda name=name, seed=seed, cmd=cmd, d=d:
                             self.stage(f"{name}_seed{seed}", cmd, f"{d}/results.json")))
        jobs.append((0, lambda: self.curve_reference("teacher", teacher)))
        self.parallel([job for _, job in sorted(jobs, key=lambda j: -j[0])])

    def curve_reference(self, name, model):
        """The teacher or a one-shot model evaluated as the curves are (curve_eval_iters C4 batches, the first
        curve_ppl_windows WikiText-2 windows): curves.png draws it as a horizontal line over the curves, so it
        must come from the same windows, not from the table's larger evaluation."""
        p, out = self.p, f"{self.out}/curve_refs/{name}.json"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.stage(f"curve_ref_{name}", self.py("evaluate.py", "--model", model, "--eval_block_size", p["block_size"],
                                                *self.data_flags(), "--ppl_windows", p["curve_ppl_windows"],
                                                "--eval_iters", p["curve_eval_iters"], "--batch_size",
                                                p["batch_size"], "--num_threads", self.threads, "--out", out), out)

    def prune(self, name, flags, teacher):
        d = self.run_dir(name)
        self.stage(name, self.py("prune.py", "--model", teacher, *flags, "--calibration", f"{self.data}/calibration.pt",
                                 "--eval_block_size", self.p["block_size"], "--out", f"{d}/model.pt",
                                 *self.final_eval(), "--results", f"{d}/results.json"), f"{d}/results.json")
        return d

    def sample_texts(self, teacher):
        models = {"teacher": teacher, "oneshot_magnitude": f"{self.run_dir('oneshot_magnitude')}/model.pt",
                  "ast_boosted": f"{self.run_dir('ast_boosted', self.seeds[0])}/ckpt.pt"}
        s = SAMPLES
        jobs = []
        for key, _ in SAMPLE_MODELS:
            out = f"{self.out}/samples/{key}.json"
            os.makedirs(os.path.dirname(out), exist_ok=True)
            cmd = self.py("sample.py", "--model", models[key], "--start", s["prompt"], "--num_samples",
                          s["num_samples"], "--max_new_tokens", s["max_new_tokens"], "--temperature",
                          s["temperature"], "--top_k", s["top_k"], "--seed", s["seed"], "--device", "cpu",
                          "--num_threads", self.threads, "--out", out)
            jobs.append(lambda key=key, cmd=cmd, out=out: self.stage(f"sample_{key}", cmd, out))
        self.parallel(jobs)
        return [(label, json.load(open(f"{self.out}/samples/{key}.json"))) for key, label in SAMPLE_MODELS]

    def zeroshot(self, teacher):
        """--zeroshot: the teacher and every method's final model (a trained method's first seed) through
        zeroshot.py (the first ZEROSHOT_LIMIT examples of each of the seven tasks; 0 = all), as the paper's
        second table with chance level and each stage's time."""
        from results import ZEROSHOT_COLUMNS

        limit = ZEROSHOT_LIMIT[self.args.preset]
        runs = {}
        for key in ["teacher", *METHODS]:
            if key == "teacher":
                model, out = teacher, f"{self.out}/teacher_zeroshot.json"
            else:
                _, d = self.runs(key)[0]
                model = f"{d}/{'model.pt' if METHODS[key][0] == 'prune' else 'ckpt.pt'}"
                out = f"{d}/zeroshot.json"
            self.stage(f"zeroshot_{key}", self.py("zeroshot.py", "--model", model, "--limit", limit, "--device", "cpu",
                                                  "--num_threads", self.threads, "--out", out), out)
            with open(out) as f:
                runs[key] = json.load(f)["zeroshot"]
        tasks = runs["teacher"]["tasks"]
        columns = [(k, f"{c}{'*' if tasks[k]['approximate'] else ''} (chance {100 * tasks[k]['chance']:.1f})")
                   for k, c in ZEROSHOT_COLUMNS]
        lines = [f"Zero-shot acc in % ± the harness's standard error, 0-shot, {runs['teacher']['harness']}, on "
                 + (f"the first {limit} examples of each task" if limit else "the full splits")
                 + " (trained methods: their first seed); chance = a uniform guess among each example's choices.",
                 "", "| Method | " + " | ".join(c for _, c in columns) + " | Mean | zero-shot time |",
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
    def table(self, samples=()):
        import plot
        from results import collect

        per_run = {"teacher": [(None, collect([("teacher", f"{self.out}/teacher_eval.json")], [])[0])]}
        for name in METHODS:
            per_run[name] = [(seed, collect([(name, f"{d}/results.json")], [])[0]) for seed, d in self.runs(name)]
        for name, runs in per_run.items():  # wall time of each run's stage
            for seed, row in runs:
                key = "teacher" if name == "teacher" else (name if seed is None else f"{name}_seed{seed}")
                row["wall_seconds"] = self.timings.get(key)
        summary = {"preset": self.args.preset, "seeds": self.seeds, "settings": self.p,
                   "machine": machine(self.threads, self.jobs), **summarize(per_run, self.seeds),
                   "samples": [{**s, "model_path": s["model"], "model": label} for label, s in samples],
                   "total_stage_seconds": sum(self.timings.values())}
        md = markdown(summary)
        cli.write_text(f"{self.out}/results.md", md + "\n")
        cli.write_json(f"{self.out}/results.json", summary)
        trained = [m for m, (kind, _) in METHODS.items() if kind == "train"]
        ref = {k: json.load(open(f"{self.out}/curve_refs/{k}.json")) for k in ("teacher", *oneshot_methods())}
        refs = {key: [(LABELS[k], ref[k][key]) for k in ref] for key in ("wikitext_ppl", "val_loss")}
        plot.plot_runs([(LABELS[m], [d for _, d in self.runs(m)]) for m in trained], f"{self.out}/curves.png",
                       panels=[p for p in plot.PANELS if p[0] not in ("lr", "lambda")], references=refs,
                       title=f"demo preset {self.args.preset}: {len(self.seeds)} seed(s), mean with min-max band; "
                             f"horizontal lines: the teacher and the one-shot models; evaluations on "
                             f"{self.p['curve_eval_iters']} C4 batches and {self.p['curve_ppl_windows']} WikiText-2 "
                             f"windows")
        print("\n" + md)
        print(f"\nwrote {self.out}/results.md, results.json, curves.png and curves.json")
        return summary


def oneshot_methods():
    return [m for m, (kind, _) in METHODS.items() if kind == "prune"]


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine(threads, jobs):
    """What the numbers depend on: the CPU type (floating-point kernels differ), torch, threads, the code."""
    import torch

    from checkpoint import git_commit

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"cpu": cpu, "cpus": cpu_count(), "torch": torch.__version__, "threads_per_process": threads,
            "jobs": jobs, "python": platform.python_version(), "git_commit": git_commit(),
            "uncommitted_changes": dirty}


# ---------------------------------------------------------------------- statistics over seeds
def stats(values):
    """mean and sample standard deviation (None for one value) of a list."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n}


def beyond_spread(diffs):
    """A paired difference holds when every seed agrees in sign and |mean| > 2 sd of the differences (for 3
    seeds: t > 3.5, two-sided p < 0.08); None with one seed (no spread to compare with)."""
    s = stats(diffs)
    if s["sd"] is None:
        return None
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return bool(same_sign and abs(s["mean"]) > 2 * s["sd"])


def summarize(per_run, seeds):
    """per_run: {method key: [(seed or None, results.collect row)]} -> the rows (mean and spread over seeds, the
    per-seed values) and the paired comparisons. A one-shot (or teacher) value pairs with every seed."""
    def per_seed(key, metric):
        runs = per_run[key]
        return [runs[0][1][metric]] * len(seeds) if runs[0][0] is None else [r[metric] for _, r in runs]

    teacher = per_run["teacher"][0][1]["wikitext_ppl"]
    oneshot = per_run["oneshot_magnitude"][0][1]["wikitext_ppl"]
    control = per_seed("dense_continued", "wikitext_ppl")
    rows, by_key = [], {}
    for key, runs in per_run.items():
        seeded = runs[0][0] is not None
        ppl = [r["wikitext_ppl"] for _, r in runs]
        sparse = runs[0][1]["nm_ok"] is not None
        # a trained run against the control of its own seed; a single run against the control's mean
        ctrl = control if seeded else [sum(control) / len(control)]
        values = {"wikitext_ppl": ppl, "val_loss": [r["val_loss"] for _, r in runs],
                  "ppl_vs_control": [v / c for v, c in zip(ppl, ctrl)],
                  "ppl_vs_teacher": [v / teacher for v in ppl],
                  "gap_recovered": [(oneshot - v) / (oneshot - teacher) for v in ppl]
                  if sparse and oneshot > teacher else None}
        first = runs[0][1]
        walls = [r["wall_seconds"] for _, r in runs if r.get("wall_seconds") is not None]
        row = {"key": key, "method": LABELS.get(key, key), "training": first["training"],
               "seeds": [seed for seed, _ in runs] if seeded else None, "per_seed": values,
               **{k: (stats(v) if v is not None else None) for k, v in values.items()},
               "tokens": first["tokens_raw"] or 0, "wall_seconds": sum(walls) / len(walls) if walls else None,
               "nm_ok": all(r["nm_ok"] for _, r in runs) if sparse else None,
               "mean_sparsity": first["mean_sparsity"], "sources": [r["source"] for _, r in runs]}
        rows.append(row)
        by_key[key] = row
    comparisons = []
    for a, b in COMPARISONS:
        if a not in per_run or b not in per_run:
            continue
        pa, pb = per_seed(a, "wikitext_ppl"), per_seed(b, "wikitext_ppl")
        va, vb = per_seed(a, "val_loss"), per_seed(b, "val_loss")
        if per_run[a][0][0] is None and per_run[b][0][0] is None:  # two single runs: one difference, no spread
            pa, pb, va, vb = pa[:1], pb[:1], va[:1], vb[:1]
        rel = [x / y - 1 for x, y in zip(pa, pb)]
        dv = [x - y for x, y in zip(va, vb)]
        comparisons.append({"a": a, "b": b, "label": f"{LABELS[a]} vs {LABELS[b]}", "seeds": seeds[:len(rel)],
                            "wikitext_ppl_rel": {"per_seed": rel, **stats(rel), "holds": beyond_spread(rel)},
                            "val_loss_diff": {"per_seed": dv, **stats(dv), "holds": beyond_spread(dv)}})
    return {"teacher_ppl": teacher, "oneshot_magnitude_gap": oneshot / teacher - 1, "rows": rows,
            "by_key": by_key, "comparisons": comparisons}


# ---------------------------------------------------------------------- Markdown
def cell(s, fmt, pct=False):
    """'mean ± sd' (or the one value) of a stats dict."""
    if s is None:
        return "–"
    scale, unit = (100, " %") if pct else (1, "")
    if s["sd"] is None:
        return f"{format(scale * s['mean'], fmt)}{unit}"
    return f"{format(scale * s['mean'], fmt)} ± {format(scale * s['sd'], fmt.lstrip('+'))}{unit}"


def verdict(d):
    if d["holds"] is None:
        return "– (one run each)"
    if not d["holds"]:
        return "no"
    return "yes, A better" if d["mean"] < 0 else "yes, B better"


def markdown(summary):
    m, s = summary["machine"], summary["settings"]
    windows = s["ppl_windows"]
    seeds = summary["seeds"]
    lines = [f"Preset `{summary['preset']}`; retraining seeds {', '.join(map(str, seeds))} (mean ± sample standard "
             f"deviation over seeds; one-shot rows and the teacher are single, deterministic runs); WikiText-2 "
             f"perplexity on {'the full test set' if not windows else f'the first {windows} windows'} of "
             f"{s['block_size']} tokens, C4 validation loss on {s['eval_iters']} batches of {s['batch_size']} x "
             f"{s['block_size']} tokens. One-shot 2:4 magnitude pruning costs "
             f"{100 * summary['oneshot_magnitude_gap']:.1f} % perplexity against the teacher.", "",
             f"Machine: {m['cpu']} ({m['cpus']} CPUs), torch {m['torch']}, {m['threads_per_process']} thread(s) per "
             f"process, {m['jobs']} job(s) at a time, Python {m['python']}, git commit {m['git_commit'][:12]}"
             f"{' with uncommitted changes' if m['uncommitted_changes'] else ''}. The numbers are identical on the "
             f"same CPU type whatever the load and --jobs (the threads per process and the teacher's ranks are "
             f"part of the recipe: they change the last digits); other CPUs differ (README, \"Demo\").", "",
             "| Method | Training | WikiText-2 ppl | ppl / dense control | ppl / teacher | one-shot gap recovered "
             "| C4 val loss | tokens per seed | wall time per seed | 2:4 check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        check = "dense" if r["nm_ok"] is None else ("2:4 ✓" if r["nm_ok"] else "✗ NOT 2:4")
        wall = "–" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f} s"
        lines.append(f"| {r['method']} | {r['training']} | {cell(r['wikitext_ppl'], '.2f')} | "
                     f"{cell(r['ppl_vs_control'], '.3f')} | {cell(r['ppl_vs_teacher'], '.3f')} | "
                     f"{cell(r['gap_recovered'], '.1f', pct=True)} | {cell(r['val_loss'], '.4f')} | "
                     f"{r['tokens']:,} | {wall} | {check} |")
    lines += ["", "Paired comparisons (A − B seed by seed, the same data order for both; negative = A better). "
              "\"Beyond the spread\": every seed agrees in sign and |mean| > 2 × the standard deviation of the "
              "paired differences.", "",
              "| A vs B | WikiText-2 ppl, A / B − 1 | per seed (%) | beyond the spread? | C4 val loss, A − B "
              "| per seed | beyond the spread? |", "|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        p, v = c["wikitext_ppl_rel"], c["val_loss_diff"]
        lines.append(f"| {c['label']} | {cell(p, '+.2f', pct=True)} | "
                     f"{', '.join(f'{100 * d:+.2f}' for d in p['per_seed'])} | {verdict(p)} | {cell(v, '+.4f')} | "
                     f"{', '.join(f'{d:+.4f}' for d in v['per_seed'])} | {verdict(v)} |")
    if summary.get("samples"):
        first = summary["samples"][0]
        lines += ["", f"Samples (`sample.py`, temperature {first['temperature']}, top-k {first['top_k']}, seed "
                      f"{first['seed']}, {first['max_new_tokens']} new tokens) of the prompt "
                      f"“{first['prompt']}”:", ""]
        for smp in summary["samples"]:
            for text in smp["samples"]:
                lines.append(f"- **{smp['model']}**: …{' '.join(text.split())}")
    return "\n".join(lines)


def main(argv=None):
    p = cli.ArgumentParser(prog="demo.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="default: see README for its measured time on 2 CPU cores; full: 2x pretraining, 4x "
                        "retraining, the whole WikiText-2 test set; tiny: seconds, for tests")
    p.add_argument("--out_dir", default="out/demo", help="everything goes here; rerunning reuses finished stages")
    p.add_argument("--data_root", default=cli.default_data_root(),
                   help=f"raw data folder (default ${cli.DATA_ENV} or ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="the teacher's and calibration's seed, and the first "
                                                       "retraining seed")
    p.add_argument("--seeds", type=int, default=3, help="retraining seeds per method: --seed, --seed + 1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (README, \"Demo\": why 1)")
    p.add_argument("--jobs", type=int, default=0, help="stages run at a time (0 = one per CPU)")
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
    samples = demo.sample_texts(teacher)
    summary = demo.table(samples)
    if args.zeroshot:
        summary["zeroshot"] = demo.zeroshot(teacher)
        cli.write_json(f"{demo.out}/results.json", summary)
    print(f"demo finished in {time.time() - t0:.0f} s (this invocation)")
    return summary


if __name__ == "__main__":
    try:
        cli.run(main)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same demo.py command to continue (finished stages are kept)", file=sys.stderr)
        sys.exit(130)
