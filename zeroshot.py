"""Zero-shot accuracy, the paper's second table: EleutherAI's lm-evaluation-harness on our model, offline.

    python zeroshot.py --model out/ast_boosted/ckpt.pt                     # the seven tasks, full splits
    python zeroshot.py --model out/ast_boosted_hf --tasks arc_easy,boolq --limit 200 --out out/zs.json

--model is anything checkpoint.load_model reads: a checkpoint (.pt), an export folder (masks and a separately kept
SLoRB branch restored), a Hugging Face folder of any decoder-only model, a .gguf file or a hub id. The harness runs
as a library and decides everything about a task (prompts, choices, gold, metrics): its own task YAMLs,
`include`d by small local ones written at run time that point at the splits in $SPARSE_GPT2_DATA/zeroshot (see
its README).
HarnessLM answers the harness's log-likelihood requests with the model object itself, in batches: the sparse
weights exactly as masked, SLoRB included, nothing converted or copied. It follows the rules of the harness's own
`hf` model (tokenisation, BOS, left truncation to the context), so its numbers are `lm_eval --model hf`'s.

Reported per task: acc, and acc_norm where the task defines it, with the harness's standard errors and the
number of examples; the mean of acc over the tasks (the metric AST's and Wanda's tables report), and the mean
without HellaSwag. HellaSwag: the harness's own validation file is not in the shared data, so its approximate
fallback (the same items, other preprocessing: hellaswag/PROVENANCE.md) is scored and marked approximate
everywhere; a real hellaswag/validation.jsonl, once there, is used instead with the harness's preprocessing.
"""
import os
import sys

# Never the network: set before the harness (and with it datasets and huggingface_hub) is imported.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
os.environ.update(OFFLINE)
if __name__ == "__main__" and not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # the harness's own bars have no switch: none off a terminal

import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import lm_eval  # noqa: E402
import lm_eval.evaluator  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cli  # noqa: E402
from checkpoint import load_model, tokenizer_info  # noqa: E402
from cli import UserError  # noqa: E402
from data.tokenizer import get_gpt2_encoding, has_tokenizer, hf_tokenizer, tokenizer_fingerprint  # noqa: E402
from evaluate import sparsity_report  # noqa: E402
from sources import MODEL_HELP  # noqa: E402


@dataclass(frozen=True)
class Task:
    stock: str   # the harness's own task YAML, under lm_eval/tasks
    split: str   # the split the harness scores
    file: str    # the split's rows, under $SPARSE_GPT2_DATA/zeroshot


# Our name -> the harness task. rte is GLUE RTE, as harness v0.3.0's `rte` that the pruning papers used;
# sglue_rte (SuperGLUE's copy, 6 rows differ by quotation marks) is there on request, not by default.
TASKS = {
    "boolq": Task("super_glue/boolq/default.yaml", "validation", "boolq/validation.jsonl"),
    "rte": Task("glue/rte/default.yaml", "validation", "rte/glue_validation.jsonl"),
    "hellaswag": Task("hellaswag/hellaswag.yaml", "validation", "hellaswag/validation.jsonl"),
    "winogrande": Task("winogrande/default.yaml", "validation", "winogrande/validation.jsonl"),
    "arc_easy": Task("arc/arc_easy.yaml", "test", "arc_easy/test.jsonl"),
    "arc_challenge": Task("arc/arc_challenge.yaml", "test", "arc_challenge/test.jsonl"),
    "openbookqa": Task("openbookqa/openbookqa.yaml", "test", "openbookqa/test.jsonl"),
    "sglue_rte": Task("super_glue/rte/default.yaml", "validation", "rte/validation.jsonl"),
}
DEFAULT_BATCH_SIZE = 16  # distinct sequences per forward (BENCHMARKS.md, zeroshot_throughput)
DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# Already preprocessed (query, choices, gold): the stock YAML is included with its process_docs turned off.
HELLASWAG_APPROX = "hellaswag/approx/validation.approx.jsonl.gz"
APPROX_NOTE = ("approximate: the fallback file hellaswag/approx (other preprocessing than the harness's, "
               "see hellaswag/PROVENANCE.md), not harness-exact")


def parse_tasks(spec) -> list:
    """'boolq, rte' -> ['boolq', 'rte'] (order kept, duplicates dropped); an unknown name is one line."""
    names = list(dict.fromkeys(t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)))
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown zero-shot task {', '.join(map(repr, unknown)) or '(none given)'}: choose from "
                        f"{', '.join(TASKS)}")
    return names


def task_files(tasks, data_root=None) -> dict:
    """{task: (path of its split, approximate?)}, every file checked before anything runs."""
    root = os.path.join(os.path.abspath(data_root or cli.default_data_root()), "zeroshot")
    if not os.path.isdir(root):
        raise UserError(f"zero-shot data folder {root} not found: the task splits belong in "
                        f"${cli.DATA_ENV}/zeroshot (see that folder's README.md); set {cli.DATA_ENV} or --data_root")
    files = {}
    for name in tasks:
        path, approximate = os.path.join(root, TASKS[name].file), False
        if name == "hellaswag" and not os.path.isfile(path):
            path, approximate = os.path.join(root, HELLASWAG_APPROX), True
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: the {name} split is missing from {root} (see its README.md)")
        files[name] = (path, approximate)
    return files


def write_task_yamls(files, out_dir) -> dict:
    """One YAML per task that includes the harness's own and reads the local file; {task: harness task name}."""
    stock_root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    names = {}
    for name, (path, approximate) in files.items():
        task = TASKS[name]
        names[name] = f"{name}_local"
        lines = [f"include: {os.path.join(stock_root, task.stock)}", f"task: {names[name]}", "tag: []",
                 "dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:",
                 f"    {task.split}: {json.dumps(path)}", "training_split: null",
                 f"validation_split: {'validation' if task.split == 'validation' else 'null'}",
                 f"test_split: {'test' if task.split == 'test' else 'null'}", "num_fewshot: 0"]
        if approximate:
            lines.append("process_docs: null")
        with open(os.path.join(out_dir, names[name] + ".yaml"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return names


# ------------------------------------------------------------------------------------------------ the model
def load_tokenizer(model, tokenizer_dir=""):
    """(encode(text, add_special_tokens) -> ids, eot id, prefix id) for the model, as the harness's hf model
    tokenises: the folder's own tokenizer through transformers (its default special tokens, e.g. LLaMA's BOS),
    or GPT-2's BPE (tiktoken, the same ids) for a GPT-2 model that records none."""
    info = tokenizer_info(model)
    folder = tokenizer_dir or info["dir"]
    if folder:
        if not has_tokenizer(folder):
            what = "--tokenizer" if tokenizer_dir else "the model's tokenizer source"
            raise UserError(f"{what} {folder} is gone or holds no tokenizer (tokenizer.json, tokenizer.model or "
                            f"vocab.json + merges.txt): pass --tokenizer with the model's folder or .gguf file")
        if tokenizer_dir and info["fingerprint"] and tokenizer_fingerprint(folder) != info["fingerprint"]:
            raise UserError(f"--tokenizer {folder} is not the tokenizer the model was trained with (other ids)")
        tok = hf_tokenizer(folder)[0]
        if tok.eos_token_id is None:
            raise UserError(f"the tokenizer in {folder} has no end-of-text (eos) token")
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        prefix_text = tok.decode([prefix])

        def encode(text, add_special_tokens=None):
            if add_special_tokens is None:  # the harness's default: the tokenizer's own, unless the text has them
                add_special_tokens = not text.startswith(prefix_text)
            return tok.encode(text, add_special_tokens=add_special_tokens)
        return encode, tok.eos_token_id, prefix
    if model.family != "gpt2":
        raise UserError("the model records no tokenizer folder: pass --tokenizer FOLDER with the model's tokenizer")
    enc = get_gpt2_encoding()
    return (lambda text, add_special_tokens=None: enc.encode_ordinary(text)), enc.eot_token, enc.eot_token


def length_batches(inputs, batch_size):
    """Runs of consecutive inputs (longest first) of at most batch_size, none padded to more than twice its
    length: a short prompt never pays for a long one's forward (BENCHMARKS.md, zero-shot evaluation)."""
    batch = []
    for inp in inputs:
        if batch and (len(batch) == batch_size or 2 * len(inp) < len(batch[0])):
            yield batch
            batch = []
        batch.append(inp)
    if batch:
        yield batch


class HarnessLM(TemplateLM):
    """The harness's view of one of our models: log-likelihoods of (context, continuation) token lists from
    the model's features + model.lm_head, i.e. the model's own forward (its logits are lm_head(features)), with the
    head applied only where a scored token is predicted; batches of distinct inputs, longest first."""

    def __init__(self, model, batch_size=DEFAULT_BATCH_SIZE, device="cpu", ctx=None, tokenizer_dir="",
                 progress=False):
        super().__init__()
        self.model, self.max_length, self.batch_size = model, model.config.block_size, batch_size
        self._device, self.ctx, self.progress = device, ctx or contextlib.nullcontext(), progress
        self.encode, self._eot, self._prefix = load_tokenizer(model, tokenizer_dir)
        self.truncated = defaultdict(int)  # requests cut from the left to the context, per harness task
        self.requests, self.scoring_seconds = 0, 0.0

    @property
    def eot_token_id(self):
        return self._eot

    @property
    def prefix_token_id(self):  # the context of an empty context
        return self._prefix

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.encode(string, add_special_tokens)

    def loglikelihood(self, requests, disable_tqdm=False):
        out = super().loglikelihood(requests, disable_tqdm=True)  # tokenises, then _loglikelihood_tokens
        for req, cut in zip(requests, self._cut):
            self.truncated[req.task_name] += cut
        return out

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        t0 = time.perf_counter()
        n = self.max_length
        # The harness's rule: the continuation after the context, cut from the left to n + 1 tokens (the last
        # one is only a target); the model reads all but the last token.
        inputs = [tuple((ctx + cont)[-(n + 1):][:-1]) for _, ctx, cont in requests]
        self._cut = [len(ctx) + len(cont) > n + 1 for _, ctx, cont in requests]
        # One forward per distinct input: the choices of a one-token answer (BoolQ, RTE) share theirs.
        users, need = defaultdict(list), {}
        for i, (inp, (_, _, cont)) in enumerate(zip(inputs, requests)):
            users[inp].append(i)
            need[inp] = max(need.get(inp, 0), len(cont))  # trailing positions whose predictions are scored
        order = sorted(users, key=len, reverse=True)  # longest first: little padding, the memory peak first
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="zero-shot", disable=not self.progress, leave=False,
                   dynamic_ncols=True)
        for batch in length_batches(order, self.batch_size):
            # right padding: in a causal model no real position sees the padding after it
            x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
            for row, inp in enumerate(batch):
                x[row, :len(inp)] = torch.tensor(inp)
            with self.ctx:
                # through forward (not .features) so that a model sharded by FSDP gathers its root's
                # parameters (embeddings, the head) as in training
                feats = self.model(x.to(self._device), features_only=True)
                picked = torch.cat([feats[row, len(inp) - need[inp]:len(inp)] for row, inp in enumerate(batch)])
                logprobs = torch.log_softmax(self.model.lm_head(picked).float(), dim=-1)
            # every scored token of the batch at once (one device sync): its row in logprobs, its id, its request
            pos, tok, owner, start = [], [], [], 0
            for inp in batch:
                end = start + need[inp]
                for i in users[inp]:
                    cont = requests[i][2]
                    pos += range(end - len(cont), end)
                    tok += cont
                    owner += [i] * len(cont)
                start = end
            pos = torch.tensor(pos, device=logprobs.device)
            lp = logprobs[pos, torch.tensor(tok, device=logprobs.device)]
            # greedy: each scored token is a most likely one (argmax but for exact ties; no task here uses it);
            # amax is several times cheaper than argmax over the vocabulary on CPU
            greedy = (lp == logprobs.amax(dim=-1)[pos]).tolist()
            for i, value, top in zip(owner, lp.tolist(), greedy):
                ll, all_top = results[i] or (0.0, True)
                results[i] = (ll + value, all_top and top)
            bar.update(sum(len(users[inp]) for inp in batch))
        bar.close()
        self.requests += len(requests)
        self.scoring_seconds += time.perf_counter() - t0
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise UserError("zeroshot.py scores multiple-choice tasks only (no rolling log-likelihood)")

    def generate_until(self, requests, disable_tqdm=False):
        raise UserError("zeroshot.py scores multiple-choice tasks only (no generation)")


# ------------------------------------------------------------------------------------------------ evaluation
def _quiet_harness():
    """The harness and datasets as a library: warnings only, no dataset progress bars, offline for sure."""
    import datasets
    import huggingface_hub.constants

    for name in ("lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)  # not the stock YAMLs' own notes (metric defaults)
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # modules imported before this one read the environment already: tell them too
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def evaluate_model(model, tasks=DEFAULT_TASKS, limit=0, batch_size=DEFAULT_BATCH_SIZE, device="cpu", ctx=None,
                   tokenizer_dir="", data_root=None, progress=False, per_doc=False) -> dict:
    """Zero-shot results of the model, in memory, on the tasks (names of TASKS): the "zeroshot" entry of
    results.json and of zeroshot.py --out. limit: the first N examples of each task (0 = all). per_doc: also
    each example's choice log-likelihoods and acc (for tests)."""
    files = task_files(parse_tasks(tasks), data_root)
    _quiet_harness()
    lm = HarnessLM(model, batch_size, device, ctx, tokenizer_dir, progress)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="zeroshot_tasks_") as tmp:
            names = write_task_yamls(files, tmp)
            manager = lm_eval.tasks.TaskManager(include_path=tmp, include_defaults=False)
            # the harness's evaluate() on its loaded tasks: simple_evaluate() would add only what this needs not
            # (model construction, seeds, a pip/git/env survey) to the same call
            out = lm_eval.evaluator.evaluate(lm=lm, task_dict=manager.load(list(names.values())),
                                             limit=limit or None, log_samples=True)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    per_task, docs = {}, {}
    for name, hname in names.items():
        res, samples = out["results"][hname], out["samples"][hname]
        path, approximate = files[name]
        row = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in res:
                stderr = res[f"{metric}_stderr,none"]  # "N/A" for a single example
                row.update({metric: res[f"{metric},none"],
                            f"{metric}_stderr": stderr if isinstance(stderr, (int, float)) else None})
        row.update(n=out["n-samples"][hname]["effective"], n_split=out["n-samples"][hname]["original"],
                   chance=sum(1 / len(s["arguments"]) for s in samples) / len(samples),
                   truncated_requests=lm.truncated[hname], split=TASKS[name].split, file=path,
                   harness_task=f"{TASKS[name].stock} (as {hname})", version=out["versions"].get(hname),
                   approximate=approximate)
        if approximate:
            row["note"] = APPROX_NOTE
        per_task[name] = row
        docs[name] = [{"doc_id": s["doc_id"], "lls": [r[0] for r in s["filtered_resps"]], "acc": s["acc"]}
                      for s in sorted(samples, key=lambda s: s["doc_id"])]
    examples = sum(r["n"] for r in per_task.values())
    result = {"harness": f"lm_eval {lm_eval.__version__}", "num_fewshot": 0, "limit": limit or None,
              "metric": "acc, unnormalised (as AST's and Wanda's tables); acc_norm beside it where the task has it",
              "tasks": per_task, **means(per_task), "examples": examples, "requests": lm.requests,
              "batch_size": batch_size, "device": str(device), "seconds": round(seconds, 2),
              "scoring_seconds": round(lm.scoring_seconds, 2), "examples_per_s": round(examples / seconds, 2)}
    if per_doc:
        result["per_doc"] = docs
    return result


def means(per_task) -> dict:
    """The mean of acc over the tasks, and without HellaSwag (which may be approximate)."""
    accs = {name: row["acc"] for name, row in per_task.items()}
    out = {"mean_acc": sum(accs.values()) / len(accs), "mean_tasks": list(accs),
           "mean_includes_approximate": any(row["approximate"] for row in per_task.values())}
    if "hellaswag" in accs:
        rest = [v for k, v in accs.items() if k != "hellaswag"]
        out["mean_acc_without_hellaswag"] = sum(rest) / len(rest) if rest else None
    return out


def report(z) -> str:
    """The results as the lines zeroshot.py prints (percentages, ± the harness's standard error)."""
    def pct(row, key):
        if key not in row:
            return f"{'–':>14}"
        stderr = row[key + "_stderr"]
        return f"{100 * row[key]:6.2f} ± " + (f"{100 * stderr:5.2f}" if stderr is not None else "  n/a")

    lines = [f"{'task':<16}{'n':>7}  {'acc':>14}  {'acc_norm':>14}  {'chance':>6}"]
    for name, row in z["tasks"].items():
        label = name + ("*" if row["approximate"] else "")
        lines.append(f"{label:<16}{row['n']:>7}  {pct(row, 'acc')}  {pct(row, 'acc_norm')}  {100 * row['chance']:6.1f}")
    star = "*" if z["mean_includes_approximate"] else ""
    lines.append(f"mean acc over {len(z['mean_tasks'])} task{'s' * (len(z['mean_tasks']) > 1)}{star}: "
                 f"{100 * z['mean_acc']:.2f}"
                 + (f"; without hellaswag: {100 * z['mean_acc_without_hellaswag']:.2f}"
                    if z.get("mean_acc_without_hellaswag") is not None else ""))
    lines.append(f"acc is the metric of AST's and Wanda's tables; 0-shot, {z['harness']}"
                 + (f"; first {z['limit']} examples per task only, not comparable with full-split numbers"
                    if z["limit"] else "")
                 + f"; {z['examples']} examples in {z['seconds']:.1f} s ({z['examples_per_s']:.1f}/s)")
    if star:
        lines.append(f"* hellaswag: {APPROX_NOTE}")
    return "\n".join(lines)


def main(argv=None):
    p = cli.ArgumentParser(prog="zeroshot.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=0, help="first N examples per task (0 = the full splits)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="distinct sequences per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights dtype (log-softmax always in float32)")
    p.add_argument("--tokenizer", default="", help="the model's tokenizer: a folder, .gguf file or hub id (default: the one the model "
                                                   "records; GPT-2's BPE for GPT-2 models without one)")
    p.add_argument("--data_root", default="", help=f"folder holding zeroshot/ (default ${cli.DATA_ENV} or "
                                                   "../shared/data)")
    p.add_argument("--num_threads", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here (results.py renders them)")
    args = p.parse_args(argv)
    if args.limit < 0 or args.batch_size < 1:
        raise UserError("--limit must be >= 0 and --batch_size >= 1")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    tasks = parse_tasks(args.tasks)
    task_files(tasks, args.data_root)  # fail fast, before the model is loaded
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    model = load_model(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    z = evaluate_model(model, tasks, args.limit, args.batch_size, args.device, tokenizer_dir=args.tokenizer,
                       data_root=args.data_root, progress=sys.stderr.isatty())
    result = {"model": args.model, "dtype": args.dtype, **sparsity_report(model), "zeroshot": z}
    print(report(z))
    if args.out:
        cli.write_json(args.out, result)
    return result


if __name__ == "__main__":
    cli.run(main)
