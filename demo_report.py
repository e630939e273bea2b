"""demo.py's report: the machine, statistics over seeds, paired comparisons and the Markdown tables.

Pure functions of the stages' results files (no model, no torch work), so a table can be rebuilt from a finished
demo folder and the statistics are tested apart from the runs.
"""
import math
import os
import platform
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


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


def summarize(per_run, seeds, labels, pairs):
    """per_run: {method key: [(seed or None, results.collect row)]} -> the rows (mean and spread over seeds, the
    per-seed values) and the paired comparisons of `pairs` ((A, B) keys). A one-shot (or teacher) value pairs with every seed.
    With a "dense_continued" run (the toy presets) each row is also divided by that control."""
    def per_seed(key, metric):
        runs = per_run[key]
        return [runs[0][1][metric]] * len(seeds) if runs[0][0] is None else [r[metric] for _, r in runs]

    teacher = per_run["teacher"][0][1]["wikitext_ppl"]
    oneshot = per_run["oneshot_magnitude"][0][1]["wikitext_ppl"]
    control = per_seed("dense_continued", "wikitext_ppl") if "dense_continued" in per_run else None
    rows, by_key = [], {}
    for key, runs in per_run.items():
        seeded = runs[0][0] is not None
        ppl = [r["wikitext_ppl"] for _, r in runs]
        sparse = runs[0][1]["nm_ok"] is not None
        # a trained run against the control of its own seed; a single run against the control's mean
        ctrl = None if control is None else control if seeded else [sum(control) / len(control)]
        values = {"wikitext_ppl": ppl, "val_loss": [r["val_loss"] for _, r in runs],
                  "ppl_vs_control": None if ctrl is None else [v / c for v, c in zip(ppl, ctrl)],
                  "ppl_vs_teacher": [v / teacher for v in ppl],
                  "gap_recovered": [(oneshot - v) / (oneshot - teacher) for v in ppl]
                  if sparse and oneshot > teacher else None}
        first = runs[0][1]
        walls = [r["wall_seconds"] for _, r in runs if r.get("wall_seconds") is not None]
        row = {"key": key, "method": labels.get(key, key), "training": first["training"],
               "seeds": [seed for seed, _ in runs] if seeded else None, "per_seed": values,
               **{k: (stats(v) if v is not None else None) for k, v in values.items()},
               "tokens": first["tokens_raw"] or 0, "wall_seconds": sum(walls) / len(walls) if walls else None,
               "nm_ok": all(r["nm_ok"] for _, r in runs) if sparse else None,
               "mean_sparsity": first["mean_sparsity"], "sources": [r["source"] for _, r in runs]}
        rows.append(row)
        by_key[key] = row
    comparisons = []
    for a, b in pairs:
        if a not in per_run or b not in per_run:
            continue
        pa, pb = per_seed(a, "wikitext_ppl"), per_seed(b, "wikitext_ppl")
        va, vb = per_seed(a, "val_loss"), per_seed(b, "val_loss")
        if per_run[a][0][0] is None and per_run[b][0][0] is None:  # two single runs: one difference, no spread
            pa, pb, va, vb = pa[:1], pb[:1], va[:1], vb[:1]
        rel = [x / y - 1 for x, y in zip(pa, pb)]
        dv = [x - y for x, y in zip(va, vb)]
        comparisons.append({"a": a, "b": b, "label": f"{labels[a]} vs {labels[b]}", "seeds": seeds[:len(rel)],
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
    lines = header(summary)
    control = any(r["ppl_vs_control"] is not None for r in summary["rows"])
    dense = "teacher" if summary["kind"] == "toy" else "dense"
    lines += ["| Method | Training | WikiText-2 ppl | " + ("ppl / dense control | " if control else "")
              + f"ppl / {dense} | one-shot gap recovered | C4 val loss | tokens per seed | wall time per seed | "
              "2:4 check |", "|---" * (10 if control else 9) + "|"]
    for r in summary["rows"]:
        check = "dense" if r["nm_ok"] is None else ("2:4 ✓" if r["nm_ok"] else "✗ NOT 2:4")
        wall = "–" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f} s"
        lines.append(f"| {r['method']} | {r['training']} | {cell(r['wikitext_ppl'], '.2f')} | "
                     + (f"{cell(r['ppl_vs_control'], '.3f')} | " if control else "")
                     + f"{cell(r['ppl_vs_teacher'], '.3f')} | "
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
    return "\n".join(lines + samples_markdown(summary.get("samples")))


def header(summary):
    """The protocol and machine lines above the table."""
    m, s, seeds = summary["machine"], summary["settings"], summary["seeds"]
    windows = s["ppl_windows"]
    where = f"{'the full test set' if not windows else f'the first {windows} windows'}"
    machine_line = (f"Machine: {m['cpu']} ({m['cpus']} CPUs), torch {m['torch']}, {m['threads_per_process']} thread(s)"
                    f" per process, {m['jobs']} job(s) at a time, Python {m['python']}, git commit "
                    f"{m['git_commit'][:12]}{' with uncommitted changes' if m['uncommitted_changes'] else ''}.")
    if summary["kind"] == "toy":
        return [f"Preset `{summary['preset']}`; retraining seeds {', '.join(map(str, seeds))} (mean ± sample standard "
                f"deviation over seeds; one-shot rows and the teacher are single, deterministic runs); WikiText-2 "
                f"perplexity on {where} of {s['block_size']} tokens, C4 validation loss on {s['eval_iters']} batches "
                f"of {s['batch_size']} x {s['block_size']} tokens. One-shot 2:4 magnitude pruning costs "
                f"{100 * summary['oneshot_magnitude_gap']:.1f} % perplexity against the teacher.", "",
                machine_line + " The numbers are identical on the same CPU type whatever the load and --jobs (the "
                "threads per process and the teacher's ranks are part of the recipe: they change the last digits); "
                "other CPUs differ (docs/demo.md).", ""]
    one = len(seeds) == 1
    metric = s.get("mask_metric", "magnitude")
    origin = (f"every method from the same dense model (the retraining methods' 2:4 masks by {metric} scores"
              + (", from the calibration windows" if metric == "wanda" else "") + ")")
    return [f"Preset `{summary['preset']}`: {summary['model_name']}, {origin}. "
            f"Retraining seed{'' if one else 's'} {', '.join(map(str, seeds))}"
            + (" (one draw: a difference between two retrained rows is a claim only beyond the seed spread, which "
               "one seed cannot show)" if one else " (mean ± sample standard deviation over seeds)")
            + f"; one-shot rows and the dense model are single, deterministic runs. WikiText-2 perplexity on {where}"
            f" of {s['eval_block_size']} tokens (the model's own tokenizer), C4 validation loss on "
            f"{8 * s['eval_iters']} windows of {s['eval_block_size']} tokens; training windows of {s['block_size']} "
            f"tokens, {s['batch_size']} per step.", "",
            machine_line + " Identical run to run on one CPU type; other CPUs differ in the last digits.", ""]


def samples_markdown(samples):
    """Toy presets: sampled continuations of one prompt; real models: greedy continuations of each prompt."""
    if not samples:
        return []
    first = samples[0]
    if first["temperature"]:
        lines = ["", f"Samples (`sample.py`, temperature {first['temperature']}, top-k {first['top_k']}, seed "
                     f"{first['seed']}, {first['max_new_tokens']} new tokens) of the prompt “{first['prompt']}”:", ""]
        for smp in samples:
            lines += [f"- **{smp['model']}**: …{' '.join(text.split())}" for text in smp["samples"]]
        return lines
    lines = ["", f"Greedy continuations (`sample.py --temperature 0`, {first['max_new_tokens']} new tokens):"]
    for prompt in [p["prompt"] for p in first["prompts"]]:
        lines += ["", f"“{prompt}”", "", "| Model | continuation |", "|---|---|"]
        for smp in samples:
            text = next(p["samples"][0] for p in smp["prompts"] if p["prompt"] == prompt)
            lines.append(f"| {smp['model']} | …{' '.join(text.split())} |")
    return lines


def zeroshot_markdown(runs, limit, labels, timings, columns):
    """The paper's second table: runs {key: zeroshot.py's "zeroshot" dict}, columns [(task, name)]."""
    first = next(iter(runs.values()))
    tasks = first["tasks"]
    heads = [f"{c}{'*' if tasks[k]['approximate'] else ''} (chance {100 * tasks[k]['chance']:.1f})" for k, c in columns]
    lines = [f"Zero-shot acc in % ± the harness's standard error, 0-shot, {first['harness']}, on "
             + (f"the first {limit} examples of each task" if limit else "the full splits")
             + " (trained methods: their first seed); chance = a uniform guess among each example's choices.",
             "", "| Method | " + " | ".join(heads) + " | Mean | zero-shot time |", "|---" * (len(columns) + 3) + "|"]
    for key, z in runs.items():
        rows = [z["tasks"][k] for k, _ in columns]
        cells = [f"{100 * t['acc']:.1f}" + (f" ± {100 * t['acc_stderr']:.1f}" if t["acc_stderr"] else "")
                 for t in rows]
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + f" | {100 * z['mean_acc']:.1f} | "
                     f"{timings.get(f'zeroshot_{key}', 0):.0f} s |")
    if any(t["approximate"] for t in tasks.values()):
        lines += ["", "* HellaSwag from the approximate fallback file (see zeroshot.py), not harness-exact."]
    return "\n".join(lines)
