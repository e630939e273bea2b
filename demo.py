"""The paper's experiment on a real pretrained model, offline on a CPU: one command from raw text to both tables.

    python demo.py                      # SmolLM2-135M-Instruct, every method, 28 min on 2 cores (docs/demo.md)
    python demo.py --seeds 3            # three retraining seeds (claims beyond the seed spread), ~3x the training
    python demo.py --preset gpu         # the same experiment sized for one GPU (tens of millions of tokens)
    python demo.py --preset toy         # the toy experiment: a small GPT-2 teacher pretrained here, 3 seeds
    python demo.py --preset tiny        # the toy experiment in seconds (used by the tests)

Real-model presets (default, gpu): the model (by default the SmolLM2 .gguf under --data_root/models) is exported
once to an ordinary transformers folder; C4, WikiText-2 and the calibration windows are tokenised with its own
tokenizer; then every method starts from that folder: one-shot magnitude, Wanda, SparseGPT and Wanda + local
reconstruction; naive retraining (fixed mask), AST-Naive and AST-Boosted at equal tokens, the last two distilled
from the dense model. Every row gets WikiText-2 perplexity and C4 validation loss; the dense model, the best
one-shot model and AST-Boosted get the seven zero-shot tasks (the first zeroshot_limit examples each); every model
continues two prompts greedily. results.md holds both tables, the machine, the commit and what they show.

Toy presets (toy, toy_full, tiny): no pretrained GPT-2 exists offline, so the demo pretrains its own small dense
GPT-2 teacher with main.py and runs every method (also a dense control, GMP and IMP) from it, each retraining
method once per seed, with the mean and spread over seeds and the paired differences the paper's claims rest on.

Every stage is a public command (printed before it runs, written at the top of its log); a finished stage is
skipped on the next run and an interrupted training stage resumes from its checkpoint. Stages run with --threads
torch threads (default 1), --jobs at a time (default: one per CPU): two threads of one process busy-wait on each
other when another program holds a core; one-thread processes only share the CPUs (docs/demo.md, "Threads: one per process").
"""
import concurrent.futures
import glob
import json
import os
import shlex
import subprocess
import sys
import threading
import time

import cli
from cli import UserError
from demo_report import cpu_count, machine, markdown, summarize, zeroshot_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"  # under --data_root

# Real-model presets. block_size / batch_size: the training window and windows per step; retrain_iters steps of
# them for every retrained method; eval_block_size: the evaluation window of every row (WikiText-2 ppl_windows
# windows, C4 8 x eval_iters windows); curve_*: the cheap evaluations every eval_interval steps drawn as curves;
# calib x calib_seqlen: the calibration windows of Wanda, SparseGPT and the reconstruction; zeroshot_limit: the first
# examples of each zero-shot task (0 = all). The default is sized to fit 30 minutes on 2 CPU cores (README, "The real-model table").
# mask_metric: the retraining methods' mask scores. The paper's is magnitude; on SmolLM2 (weights on a 4-bit grid,
# 15 % of the 2:4 groups tied) AST's first mask recompute then swaps tied weights, which costs more than 30 steps
# recover (docs/ties.md, "The mask-update spike on a real model"); Wanda scores |W|·||X|| have no such ties.
REAL = dict(kind="pretrained", model="", mask_metric="wanda", device="cpu", block_size=256, batch_size=4,
            retrain_iters=27, retrain_lr=1e-4, eval_interval=10, curve_eval_iters=1, curve_ppl_windows=2, eval_block_size=512,
            eval_iters=1, ppl_windows=16, calib=16, calib_seqlen=512, recon_epochs=1, recon_lr=1e-4,
            zeroshot_limit=20, seeds=1)
PRESETS = {
    "default": REAL,
    # One GPU: 2,000 steps of 16 x 1024 tokens (33M tokens per method), the full WikiText-2 test set at 2048, 128
    # calibration windows of 2048 (Wanda's and SparseGPT's setting), the full zero-shot splits, 3 seeds. Never run
    # here at this size (the tests run it at a tiny scale with --set): no figure of it is reported as measured.
    # It needs more C4 than ../shared/data holds (data/c4_dataset/prepare.py --download 8 gives about 1.4B tokens).
    "gpu": dict(REAL, device="cuda", block_size=1024, batch_size=16, retrain_iters=2000, eval_interval=200,
                curve_eval_iters=4, curve_ppl_windows=16, eval_block_size=2048, eval_iters=40, ppl_windows=0,
                calib=128, calib_seqlen=2048, recon_epochs=10, zeroshot_limit=0, seeds=3),
    # Toy presets: the teacher's shape and pretraining; retrain: the budget every trained method gets (same for all
    # of them, per seed). eval_iters / ppl_windows: the final evaluation, which the table reports (C4 validation
    # batches of batch_size x block_size, WikiText-2 windows of block_size).
    "tiny": dict(kind="toy", n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, teacher_iters=6,
                 teacher_lr=3e-3, retrain_iters=4, retrain_lr=1e-3, eval_interval=2, curve_eval_iters=1,
                 curve_ppl_windows=2, eval_iters=2, ppl_windows=4, calib=8, teacher_ranks=1, zeroshot_limit=2,
                 seeds=3),
    # Sized on the 2-core development CPU (docs/demo.md, "Time", sizing table). The lm_head over GPT-2's 50257 tokens
    # costs the same whatever the blocks are, so a narrow teacher with several blocks is the cheap way to make the
    # blocks matter: after 1.5M tokens one-shot 2:4 magnitude pruning costs 8 x 32 blocks 56 % in perplexity,
    # 12 x 32 34 %, 4 x 32 29 %, 4 x 64 16 %; 12 x 32 after 0.5M tokens only 14 %.
    "toy": dict(kind="toy", n_layer=8, n_head=4, n_embd=32, block_size=128, batch_size=8, teacher_iters=1500,
                teacher_lr=5e-3, retrain_iters=60, retrain_lr=1e-3, eval_interval=5, curve_eval_iters=2,
                curve_ppl_windows=8, eval_iters=10, ppl_windows=200, calib=32, teacher_ranks=2, zeroshot_limit=500,
                seeds=3),
    # The same recipe with twice the pretraining, four times the retraining and the full WikiText-2 test set.
    "toy_full": dict(kind="toy", n_layer=8, n_head=4, n_embd=32, block_size=128, batch_size=8, teacher_iters=3000,
                     teacher_lr=5e-3, retrain_iters=400, retrain_lr=1e-3, eval_interval=20, curve_eval_iters=4,
                     curve_ppl_windows=32, eval_iters=40, ppl_windows=0, calib=64, teacher_ranks=2, zeroshot_limit=0,
                     seeds=3),
}

# method -> (kind, main.py / prune.py flags). "prune": one-shot, run once (deterministic given the calibration
# windows); "train": retrained once per seed. All trained sparse methods start from the dense model's weights.
DISTILL = ["--distill_model", "True", "--hardness_task", "0.33", "--hardness_kldiv", "0.67",
           "--hardness_squarehead", "0"]
# The toy table was made with torch's AdamW for the runs without SR-STE (main.py's choice before --optimizer
# alone chose it) and nanoGPT's warm-up (lr (it+1)/(warmup+1)): the toy presets name both, so their table stays.
PLAIN_ADAMW = ["--optimizer", "adamw", "--srste_decay", "0"]
TOY_METHODS = {
    "dense_continued": ("train", ["--mode", "dense", *PLAIN_ADAMW]),
    "oneshot_magnitude": ("prune", ["--method", "magnitude"]),
    "oneshot_wanda": ("prune", ["--method", "wanda"]),
    # local reconstruction at 3e-3: of 1e-4, 1e-3, 3e-3 (10 epochs) and 1e-3 (20 epochs), the best C4 validation
    # loss on this teacher over 5 calibration seeds (docs/oneshot.md)
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
# The real model: the paper's recipes (configs/naive_retraining.py, ast_naive.py, ast_boosted.py: the paper's
# optimizer, SR-STE 1e-4 ramped over the first quarter, masks recomputed every mask_update_interval steps) at the
# preset's budget; naive retraining, as the paper's first command, without distillation.
REAL_METHODS = {
    "oneshot_magnitude": ("prune", ["--method", "magnitude"]),
    "oneshot_wanda": ("prune", ["--method", "wanda"]),
    "oneshot_sparsegpt": ("prune", ["--method", "sparsegpt"]),
    "oneshot_wanda_recon": ("prune", ["--method", "wanda", "--reconstruct", "True", "--recon_lr", "{recon_lr}",
                                      "--recon_epochs", "{recon_epochs}", "--seed", "{seed}"]),
    "naive_retrain": ("train", ["--change_mask", "False"]),
    "ast_naive": ("train", ["--change_mask", "True", "--srste_decay", "1e-4", "--increase_step", "{ramp}",
                            *DISTILL]),
    "ast_boosted": ("train", ["--change_mask", "True", "--srste_decay", "1e-4", "--increase_step", "{ramp}",
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
REAL_COMPARISONS = [("ast_boosted", "ast_naive"), ("ast_naive", "naive_retrain"), ("ast_boosted", "naive_retrain"),
                    ("ast_boosted", "oneshot_sparsegpt"), ("oneshot_sparsegpt", "oneshot_wanda"),
                    ("oneshot_wanda_recon", "oneshot_wanda")]
# toy presets: sample.py on one prompt from the teacher, the one-shot model and AST-Boosted (its first seed)
SAMPLES = dict(prompt="The city council said on Monday that", num_samples=2, max_new_tokens=30, temperature=0.8,
               top_k=50, seed=0)
SAMPLE_MODELS = [("teacher", "Dense teacher"), ("oneshot_magnitude", "One-shot magnitude"),
                 ("ast_boosted", "AST-Boosted")]
# real models: greedy continuations of two prompts from every row's model
PROMPTS = ["The capital of France is", "The largest planet in the solar system is"]
GREEDY = dict(num_samples=1, max_new_tokens=16, temperature=0, top_k=0, seed=0)


class Demo:
    def __init__(self, args):
        self.args, self.p = args, dict(PRESETS[args.preset])
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or key not in self.p or key == "kind":
                raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                                f"{', '.join(k for k in self.p if k != 'kind')}")
            try:
                self.p[key] = type(self.p[key])(value)
            except ValueError:
                raise UserError(f"--set {item!r}: {value!r} is not a {type(self.p[key]).__name__}") from None
        seeds = self.p["seeds"] if args.seeds is None else args.seeds
        if seeds < 1 or args.threads < 1 or args.jobs < 0:
            raise UserError("--seeds and --threads must be at least 1, --jobs at least 0 (0 = one per CPU)")
        self.toy = self.p["kind"] == "toy"
        self.methods = TOY_METHODS if self.toy else REAL_METHODS
        if self.p.get("mask_metric", "magnitude") not in ("magnitude", "wanda"):
            raise UserError(f"--set mask_metric={self.p['mask_metric']}: expected magnitude or wanda")
        self.labels = dict(LABELS)
        self.threads, self.jobs = args.threads, args.jobs or cpu_count()
        self.seeds = [args.seed + i for i in range(seeds)]
        self.out = os.path.abspath(args.out_dir)
        self.data = os.path.join(self.out, "data")
        self.timings_path = os.path.join(self.out, "stage_seconds.json")
        self.timings = json.load(open(self.timings_path)) if os.path.isfile(self.timings_path) else {}
        self.cpu_path = os.path.join(self.out, "stage_cpu_seconds.json")
        self.cpu_seconds = json.load(open(self.cpu_path)) if os.path.isfile(self.cpu_path) else {}
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
            code, cpu = wait_with_cpu_time(proc)
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
            if cpu is not None:  # CPU seconds of the stage's processes: what sizes a preset, whatever the load
                self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu
                cli.write_json(self.cpu_path, self.cpu_seconds)

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

    def eval_window(self):
        return self.p["block_size"] if self.toy else self.p["eval_block_size"]

    def final_eval(self):
        """The evaluation the table reports, the same for every row."""
        p = self.p
        return [*self.data_flags(), "--ppl_windows", p["ppl_windows"], "--eval_iters", p["eval_iters"],
                "--batch_size", p["batch_size"], "--num_threads", self.threads]

    def curve_eval(self):
        p = self.p
        return [*self.data_flags(), "--eval_iters", p["curve_eval_iters"], "--ppl_windows", p["curve_ppl_windows"],
                "--final_eval_iters", p["eval_iters"], "--final_ppl_windows", p["ppl_windows"]]

    def train_flags(self, iters, lr, out_dir, seed, eval_interval=None, ranks=1):
        p = self.p
        every = eval_interval or p["eval_interval"]
        common = ["--out_dir", out_dir, "--seed", seed, "--block_size", p["block_size"],
                  "--batch_size", p["batch_size"] // ranks, "--global_batch_size", p["batch_size"],
                  "--max_iters", iters, "--learning_rate", lr, "--min_lr", lr / 10,
                  "--warmup_iters", max(iters // 10, 1), "--lr_decay_iters", iters]
        if not self.toy:
            return [*common, "--eval_interval", every, "--log_interval", 1, "--progress", "False",
                    "--num_threads", self.threads, "--device", p["device"], "--eval_block_size",
                    p["eval_block_size"], "--keep_checkpoints", 1, *self.curve_eval()]
        return [*common, "--lr_tail", "hold", "--lr_warmup", "nanogpt", "--eval_interval", every,
                "--log_interval", max(every // 2, 1), "--progress", "False", "--num_threads", self.threads,
                "--device", "cpu", "--mask_update_interval", 5, *self.curve_eval()]

    # ------------------------------------------------------------------ inputs
    def toy_inputs(self):
        root = self.args.data_root
        train = sorted(glob.glob(f"{root}/webtext/*.json.gz") + glob.glob(f"{root}/fineweb/*.json.gz")
                       + glob.glob(f"{root}/c4/en/*train*.json.gz") + glob.glob(f"{root}/c4/en/*validation.sample*"))
        return train, *self.eval_inputs()

    def real_inputs(self):
        """C4 train shards (the retraining and calibration text; all there are, the gpu preset needs many)."""
        root = self.args.data_root
        return sorted(glob.glob(f"{root}/c4/en/*train*.json.gz")), *self.eval_inputs()

    def eval_inputs(self):
        root = self.args.data_root
        val = sorted(glob.glob(f"{root}/c4/en/c4-validation.00000-of-00008*.json.gz"))
        wiki = os.path.join(root, "wikitext2")
        if not val or not os.path.isdir(wiki):
            raise UserError(f"no C4 validation / wikitext2 under {root}: pass --data_root (or set "
                            f"{cli.DATA_ENV}); with network, `python data/c4_dataset/prepare.py --download 1` and "
                            f"`python data/wikitext/prepare.py --download` fetch real data")
        return val, wiki

    def prepare_data(self, tokenizer=None):
        """C4 (train + validation), WikiText-2 and the calibration windows, with the model's own tokenizer."""
        train, val, wiki = self.toy_inputs() if self.toy else self.real_inputs()
        c4_train = [f for f in train if "/c4/" in f]
        if not c4_train:
            raise UserError(f"no C4 train shard under {self.args.data_root}/c4/en: pass --data_root (or set "
                            f"{cli.DATA_ENV}); with network, `python data/c4_dataset/prepare.py --download 1`")
        tok = ["--tokenizer", tokenizer] if tokenizer else []
        seqlen = self.p["block_size"] if self.toy else self.p["calib_seqlen"]
        self.parallel([
            lambda: self.stage("data_c4", self.py("data/c4_dataset/prepare.py", *sum((["--input", f] for f in train),
                                                                                     []),
                                                  *sum((["--val_files", f] for f in val), []), "--out_dir",
                                                  f"{self.data}/c4", *tok, "--force"), f"{self.data}/c4/meta.json"),
            lambda: self.stage("data_wikitext", self.py("data/wikitext/prepare.py", "--input", wiki, "--out_dir",
                                                        f"{self.data}/wikitext", *tok, "--force"),
                               f"{self.data}/wikitext/meta.json"),
            lambda: self.stage("data_calibration", self.py("prepare_calibration_data.py", "--input", *c4_train,
                                                           "--out", f"{self.data}/calibration.pt", "--nsamples",
                                                           self.p["calib"], "--seqlen", seqlen,
                                                           "--seed", self.args.seed, *tok, "--force"),
                               f"{self.data}/calibration.pt")])

    # ------------------------------------------------------------------ the dense model
    def pretrain_teacher(self):
        """Toy presets: main.py from scratch; with teacher_ranks > 1 as that many one-thread DDP ranks
        (torchrun), the teacher being the one stage nothing else can run beside. The rank count is the preset's,
        never the machine's: the same preset gives the same teacher on every machine of a CPU type."""
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
        self.dense_eval(hf)
        return hf

    def export_model(self):
        """Real-model presets: the model as given (.gguf, hub id, folder) -> an ordinary transformers folder that
        every later stage loads (a .gguf is dequantised once, not in every stage)."""
        source = self.p["model"] or os.path.join(self.args.data_root, DEFAULT_MODEL)
        if not self.p["model"] and not os.path.isfile(source):
            raise UserError(f"no {DEFAULT_MODEL} under {self.args.data_root}: pass --data_root (or set "
                            f"{cli.DATA_ENV}), or another model with --set model=FOLDER|FILE.gguf|OWNER/NAME")
        name = os.path.basename(source.rstrip("/")).removesuffix(".gguf")
        self.labels["teacher"] = f"Dense {name}"
        folder = os.path.join(self.out, "model")
        self.stage("model", self.py("export.py", "--checkpoint", source, "--out", folder, "--force"),
                   f"{folder}/config.json")
        return folder

    def dense_eval(self, model):
        out = f"{self.out}/teacher_eval.json"
        self.stage("teacher_eval", self.py("evaluate.py", "--model", model, "--eval_block_size", self.eval_window(),
                                           *self.final_eval(), "--out", out), out)

    # ------------------------------------------------------------------ the methods
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
        if self.methods[name][0] == "prune":
            return [(None, self.run_dir(name))]
        return [(seed, self.run_dir(name, seed)) for seed in self.seeds]

    def model_path(self, name, teacher):
        """The file a method's (first seed's) final model is in."""
        if name == "teacher":
            return teacher
        _, d = self.runs(name)[0]
        return f"{d}/{'model.pt' if self.methods[name][0] == 'prune' else 'ckpt.pt'}"

    def run_methods(self, teacher):
        """Every (method, seed) run, --jobs at a time; the longest runs are started first."""
        p = self.p
        iters = p["retrain_iters"]
        fill = {"prune_end": max(2 * iters // 3, 1), "ramp": max(iters // 4, 1), "seed": self.args.seed,
                "recon_lr": p.get("recon_lr"), "recon_epochs": p.get("recon_epochs")}
        jobs = []
        for name, (kind, flags) in self.methods.items():
            flags = [f.format(**fill) for f in flags]
            if kind == "prune":
                cost = 0 if self.toy else {"magnitude": 0}.get(flags[1], 1 + ("--reconstruct" in flags))
                jobs.append((cost, lambda name=name, flags=flags: self.curve_reference(
                    name, f"{self.prune(name, flags, teacher)}/model.pt")))
                continue
            for seed, d in self.runs(name):
                cmd = self.py("main.py", "--student_model", teacher, "--teacher_model", teacher,
                              *self.init_flags(d, ""), *flags, *self.mask_flags(),
                              *self.train_flags(iters, p["retrain_lr"], d, seed))
                cost = (2 if self.toy else 3) if "--distill_model" in flags else (1 if self.toy else 2)
                jobs.append((cost, lambda name=name, seed=seed, cmd=cmd, d=d:
                             self.stage(f"{name}_seed{seed}", cmd, f"{d}/results.json")))
        jobs.append((0, lambda: self.curve_reference("teacher", teacher)))
        if not self.toy:
            jobs.append((0, lambda: self.dense_eval(teacher)))
        self.parallel([job for _, job in sorted(jobs, key=lambda j: -j[0])])

    def mask_flags(self):
        """Real models: the retraining's mask scores (Wanda: from the demo's calibration windows, cut to the
        training window)."""
        if self.toy:
            return []
        if self.p["mask_metric"] == "magnitude":
            return ["--mask_metric", "magnitude"]
        return ["--mask_metric", "wanda", "--calibration", f"{self.data}/calibration.pt"]

    def curve_reference(self, name, model):
        """The teacher or a one-shot model evaluated as the curves are (curve_eval_iters C4 batches, the first
        curve_ppl_windows WikiText-2 windows): curves.png draws it as a horizontal line over the curves, so it
        must come from the same windows, not from the table's larger evaluation."""
        p, out = self.p, f"{self.out}/curve_refs/{name}.json"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.stage(f"curve_ref_{name}", self.py("evaluate.py", "--model", model, "--eval_block_size", self.eval_window(),
                                                *self.data_flags(), "--ppl_windows", p["curve_ppl_windows"],
                                                "--eval_iters", p["curve_eval_iters"], "--batch_size",
                                                p["batch_size"], "--num_threads", self.threads, "--out", out), out)

    def prune(self, name, flags, teacher):
        d = self.run_dir(name)
        self.stage(name, self.py("prune.py", "--model", teacher, *flags, "--calibration", f"{self.data}/calibration.pt",
                                 "--eval_block_size", self.eval_window(), "--out", f"{d}/model.pt",
                                 *self.final_eval(), "--results", f"{d}/results.json"), f"{d}/results.json")
        return d

    # ------------------------------------------------------------------ text and zero-shot
    def sample_path(self, key):
        return f"{self.out}/samples/{key}.json"

    def sample_job(self, key, teacher, prompts, settings, device):
        """One sample.py run: the model of `key` continues every prompt with the settings (num_samples, ...)."""
        out = self.sample_path(key)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = self.py("sample.py", "--model", self.model_path(key, teacher), *sum((["--start", q] for q in prompts), []),
                      *sum(([f"--{k}", v] for k, v in settings.items()), []), "--device", device,
                      "--num_threads", self.threads, "--out", out)
        return lambda: self.stage(f"sample_{key}", cmd, out)

    def sample_texts(self, teacher):
        """Toy presets: sampled continuations of one prompt from the teacher, one-shot magnitude and AST-Boosted."""
        settings = {k: v for k, v in SAMPLES.items() if k != "prompt"}
        self.parallel([self.sample_job(key, teacher, [SAMPLES["prompt"]], settings, "cpu") for key, _ in SAMPLE_MODELS])
        return [(label, json.load(open(self.sample_path(key)))) for key, label in SAMPLE_MODELS]

    def greedy_jobs(self, teacher):
        """Real models: every row's model continues PROMPTS greedily (one sample.py per model)."""
        return [self.sample_job(key, teacher, PROMPTS, GREEDY, self.p["device"]) for key in ["teacher", *self.methods]]

    def zeroshot_path(self, key):
        return f"{self.out}/teacher_zeroshot.json" if key == "teacher" else f"{self.runs(key)[0][1]}/zeroshot.json"

    def zeroshot_jobs(self, teacher, keys):
        """zeroshot.py (the first zeroshot_limit examples of each of the seven tasks; 0 = all) on the models of
        `keys` (a trained method: its first seed)."""
        jobs = []
        for key in keys:
            out = self.zeroshot_path(key)
            cmd = self.py("zeroshot.py", "--model", self.model_path(key, teacher), "--limit",
                          self.p["zeroshot_limit"], "--device", self.p.get("device", "cpu"), "--num_threads",
                          self.threads, "--out", out)
            jobs.append(lambda key=key, cmd=cmd, out=out: self.stage(f"zeroshot_{key}", cmd, out))
        return jobs

    def zeroshot_table(self, keys):
        """The paper's second table over the models of `keys`, appended to results.md."""
        from results import ZEROSHOT_COLUMNS

        runs = {}
        for key in keys:
            with open(self.zeroshot_path(key)) as f:
                runs[key] = json.load(f)["zeroshot"]
        md = zeroshot_markdown(runs, self.p["zeroshot_limit"], self.labels, self.timings, ZEROSHOT_COLUMNS)
        with open(f"{self.out}/results.md", "a") as f:
            f.write("\n" + md + "\n")
        print("\n" + md)
        return {key: z["tasks"] for key, z in runs.items()}

    def gap_only(self, teacher):
        d = self.prune("oneshot_magnitude", self.methods["oneshot_magnitude"][1], teacher)
        dense = json.load(open(f"{self.out}/teacher_eval.json"))["wikitext_ppl"]
        pruned = json.load(open(f"{d}/results.json"))["wikitext_ppl"]
        settings = " ".join(f"{k}={v}" for k, v in self.p.items() if k != "kind")
        print(f"\n{settings}\nteacher WikiText-2 ppl {dense:.2f}, one-shot 2:4 magnitude {pruned:.2f}: gap "
              f"{100 * (pruned / dense - 1):.1f} %; teacher pretraining {self.timings.get('teacher', 0):.0f} s")
        return {"teacher_ppl": dense, "oneshot_ppl": pruned, "gap": pruned / dense - 1}

    # ------------------------------------------------------------------ the table
    def table(self, samples=()):
        import plot
        from results import collect

        per_run = {"teacher": [(None, collect([("teacher", f"{self.out}/teacher_eval.json")], [])[0])]}
        for name in self.methods:
            per_run[name] = [(seed, collect([(name, f"{d}/results.json")], [])[0]) for seed, d in self.runs(name)]
        for name, runs in per_run.items():  # wall time of each run's stage
            for seed, row in runs:
                key = "teacher" if name == "teacher" else (name if seed is None else f"{name}_seed{seed}")
                row["wall_seconds"] = self.timings.get(key)
        summary = {"preset": self.args.preset, "kind": self.p["kind"], "model_name": self.labels["teacher"],
                   "seeds": self.seeds, "settings": self.p, "machine": machine(self.threads, self.jobs),
                   **summarize(per_run, self.seeds, self.labels, COMPARISONS if self.toy else REAL_COMPARISONS),
                   "samples": [{**s, "model_path": s["model"], "model": label} for label, s in samples],
                   "total_stage_seconds": sum(self.timings.values()),
                   "total_stage_cpu_seconds": sum(self.cpu_seconds.values())}
        md = markdown(summary) if self.toy else markdown(summary) + "\n\n" + reading(summary)
        cli.write_text(f"{self.out}/results.md", md + "\n")
        cli.write_json(f"{self.out}/results.json", summary)
        trained = [m for m, (kind, _) in self.methods.items() if kind == "train"]
        oneshot = [m for m, (kind, _) in self.methods.items() if kind == "prune"]
        ref = {k: json.load(open(f"{self.out}/curve_refs/{k}.json")) for k in ("teacher", *oneshot)}
        refs = {key: [(self.labels[k], ref[k][key]) for k in ref] for key in ("wikitext_ppl", "val_loss")}
        plot.plot_runs([(self.labels[m], [d for _, d in self.runs(m)]) for m in trained], f"{self.out}/curves.png",
                       panels=[p for p in plot.PANELS if p[0] not in ("lr", "lambda")], references=refs,
                       title=f"demo preset {self.args.preset}: {len(self.seeds)} seed(s), mean with min-max band; "
                             f"horizontal lines: the {'teacher' if self.toy else 'dense model'} and the one-shot "
                             f"models; evaluations on {self.p['curve_eval_iters']} C4 batches and "
                             f"{self.p['curve_ppl_windows']} WikiText-2 windows")
        print("\n" + md)
        print(f"\nwrote {self.out}/results.md, results.json, curves.png and curves.json")
        return summary

    def best_oneshot(self):
        """The one-shot method with the lowest WikiText-2 perplexity (its zero-shot row)."""
        ppl = {m: json.load(open(f"{self.run_dir(m)}/results.json"))["wikitext_ppl"]
               for m, (kind, _) in self.methods.items() if kind == "prune"}
        return min(ppl, key=ppl.get)


def wait_with_cpu_time(proc):
    """(exit code, user + system CPU seconds of the process and the children it waited for; None off Unix)."""
    if not hasattr(os, "wait4"):
        return proc.wait(), None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def reading(summary):
    """What the real-model table shows and does not, from its own numbers."""
    rows = summary["by_key"]
    ppl = {k: r["wikitext_ppl"]["mean"] for k, r in rows.items()}
    oneshot = min((k for k in ppl if k.startswith("oneshot_")), key=ppl.get)
    trained = min((k for k in ppl if rows[k]["training"].startswith("yes")), key=ppl.get)
    tokens = rows[trained]["tokens"]
    one = len(summary["seeds"]) == 1
    better = [rows[k]["method"] for k in ppl if rows[k]["training"].startswith("yes") and ppl[k] < ppl[oneshot]]
    return (f"What this shows: the best one-shot method, {rows[oneshot]['method']}, ends at "
            f"{ppl[oneshot] / ppl['teacher']:.1f} x the dense perplexity (magnitude {ppl['oneshot_magnitude'] / ppl['teacher']:.0f} x). Retraining had {tokens:,} tokens per "
            f"method ({tokens / 5e9:.0e} of the paper's 5 x 10^9); the best retrained row is {rows[trained]['method']}"
            f" at {ppl[trained] / ppl['teacher']:.1f} x the dense perplexity, and "
            + (f"{', '.join(better)} beat{'s' if len(better) == 1 else ''} the best one-shot model. " if better else
               "no retrained row beats the best one-shot model at this budget. ")
            + "What it does not show: the paper's end state (its budget needs a GPU: `--preset gpu`)"
            + ("; and with one retraining seed no difference between two retrained rows is shown to exceed the "
               "seed-to-seed spread (`--seeds 3` measures it)." if one else
               "; differences between rows count only where the paired comparisons say \"beyond the spread\"."))


def main(argv=None):
    p = cli.ArgumentParser(prog="demo.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="default: SmolLM2-135M-Instruct, about 28 min on 2 CPU cores (README, \"The real-model table\"); gpu: the same "
                        "experiment sized for one GPU; toy: a GPT-2 teacher pretrained here, 3 seeds; toy_full: 2x its "
                        "pretraining, 4x its retraining; tiny: the toy in seconds, for tests")
    p.add_argument("--out_dir", default="out/demo", help="everything goes here; rerunning reuses finished stages")
    p.add_argument("--data_root", default=cli.default_data_root(),
                   help=f"raw data folder (default ${cli.DATA_ENV} or ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="the teacher's and calibration's seed, and the first "
                                                       "retraining seed")
    p.add_argument("--seeds", type=int, default=None, help="retraining seeds per method: --seed, --seed + 1, ... "
                                                           "(default: the preset's, 1 for default, 3 otherwise)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (docs/demo.md, \"Threads: one per process\")")
    p.add_argument("--jobs", type=int, default=0, help="stages run at a time (0 = one per CPU)")
    p.add_argument("--quiet", action="store_true", help="only print the commands and the table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one preset setting, e.g. --set retrain_iters=60 or --set model=OWNER/NAME "
                        "(repeatable)")
    p.add_argument("--gap_only", action="store_true", help="toy presets: stop after the teacher and one-shot 2:4 "
                                                           "magnitude pruning; print the perplexity gap")
    p.add_argument("--zeroshot", type=cli.parse_bool, default=None,
                   help="the zero-shot table (default: on for the real-model presets, on the dense, best one-shot "
                        "and AST-Boosted models; off for the toy ones, where it covers every method)")
    args = p.parse_args(argv)
    t0 = time.time()
    demo = Demo(args)
    if args.gap_only and not demo.toy:
        raise UserError("--gap_only is for the toy presets (the real model needs no pretraining to size)")
    os.makedirs(demo.out, exist_ok=True)
    summary = run_toy(demo, args) if demo.toy else run_real(demo, args)
    print(f"demo finished in {time.time() - t0:.0f} s (this invocation)")
    return summary


def run_toy(demo, args):
    demo.prepare_data()
    teacher = demo.pretrain_teacher()
    if args.gap_only:
        return demo.gap_only(teacher)
    demo.run_methods(teacher)
    samples = demo.sample_texts(teacher)
    summary = demo.table(samples)
    if args.zeroshot:
        keys = ["teacher", *demo.methods]
        demo.parallel(demo.zeroshot_jobs(teacher, keys))
        summary["zeroshot"] = demo.zeroshot_table(keys)
        cli.write_json(f"{demo.out}/results.json", summary)
    return summary


def run_real(demo, args):
    model = demo.export_model()
    demo.prepare_data(tokenizer=model)
    demo.run_methods(model)
    keys = ["teacher", demo.best_oneshot(), "ast_boosted"] if args.zeroshot is not False else []
    demo.parallel([*demo.zeroshot_jobs(model, keys), *demo.greedy_jobs(model)])
    summary = demo.table([(demo.labels[key], json.load(open(demo.sample_path(key))))
                          for key in ["teacher", *demo.methods]])
    if keys:
        summary["zeroshot"] = demo.zeroshot_table(keys)
        cli.write_json(f"{demo.out}/results.json", summary)
    return summary


if __name__ == "__main__":
    try:
        cli.run(main)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same demo.py command to continue (finished stages are kept)", file=sys.stderr)
        sys.exit(130)
