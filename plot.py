"""Draw main.py runs' metrics.jsonl as a grid of curves (PNG), with the data behind it written beside (JSON).

    python plot.py out/ast_boosted [out/other_run ...] [--out curves.png]
    python plot.py out/demo/ast_naive out/demo/ast_boosted     # folders of seed runs: mean line, min-max band

A folder holding metrics.jsonl is one run; a folder whose sub-folders hold metrics.jsonl (demo.py's seed0, seed1,
...) is one method drawn as the mean over its runs with a band from their minimum to their maximum.
Panels: the student's own train CE beside the KL to the teacher (never their weighted sum, which is no loss one can
compare), C4 validation loss, WikiText-2 perplexity (log axis, ticks labelled), the mask flip ratio of runs whose
masks change by re-selection, and the pruned fraction of GMP/IMP runs, whose masks change by pruning instead.
"""
import json
import math
import os

import cli
from cli import UserError

# (key in metrics.jsonl, title). "ce" falls back to "loss" for runs without distillation (there loss is CE).
PANELS = [("ce", "train CE (student)"), ("kl", "train KL to the teacher (distilled runs)"),
          ("val_loss", "C4 val loss (student CE)"), ("wikitext_ppl", "WikiText-2 perplexity"),
          ("flip_ratio", "mask flip ratio (re-selected masks)"), ("pruned_fraction", "pruned fraction (GMP, IMP)"),
          ("lr", "learning rate"), ("lambda", "SR-STE λ")]
LOG_AXES = {"wikitext_ppl"}


def read_metrics(run_dir):
    """{key: ([iters], [values])}; a later line for the same iteration (after a resume) wins."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: is {run_dir} a main.py --out_dir?")
    series = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key != "iter" and isinstance(value, (int, float)):
                    series.setdefault(key, {})[row["iter"]] = value
    out = {k: (sorted(v), [v[i] for i in sorted(v)]) for k, v in series.items()}
    if "ce" not in out and "kl" not in out and "loss" in out:  # not distilled: its loss is its CE
        out["ce"] = out["loss"]
    if "pruned_fraction" in out:  # GMP/IMP: the flip ratio is not computed for them, it would read as a flat 0
        out.pop("flip_ratio", None)
    return out


def run_dirs_of(path):
    """A main.py out_dir, or a folder of them (seeds): the list of run folders it stands for."""
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return [path]
    subs = sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(path) else []
    runs = [d for d in subs if os.path.isfile(os.path.join(d, "metrics.jsonl"))]
    if not runs:
        raise UserError(f"no metrics.jsonl in {path} or its sub-folders: pass main.py --out_dir folders")
    return runs


def group_series(runs, key):
    """Mean and min-max over the runs at the iterations every run logged (None when none has the key)."""
    have = [r[key] for r in runs if key in r]
    if not have:
        return None
    common = sorted(set.intersection(*(set(iters) for iters, _ in have)))
    values = [dict(zip(iters, vals)) for iters, vals in have]
    cols = [[v[i] for v in values] for i in common]
    return {"iters": common, "mean": [sum(c) / len(c) for c in cols], "lo": [min(c) for c in cols],
            "hi": [max(c) for c in cols], "runs": len(have)}


def figure(groups, panels=PANELS, references=None, title=None, columns=3):
    """(matplotlib figure, the data it shows). groups: [(label, [run_dir, ...])] or run dirs (each its own line,
    named by its folder); references: {panel key:
    [(label, value)]} drawn as horizontal lines (e.g. the teacher and the one-shot baselines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    references = references or {}
    groups = [(os.path.basename(os.path.normpath(g)), [g]) if isinstance(g, str) else g for g in groups]
    loaded = [(label, [read_metrics(d) for d in dirs]) for label, dirs in groups]
    data = {"panels": []}
    for key, name in panels:
        series = [dict(label=label, **s) for label, runs in loaded if (s := group_series(runs, key)) is not None]
        refs = [{"label": label, "value": value} for label, value in references.get(key, [])]
        if series:
            data["panels"].append({"key": key, "title": name, "log": key in LOG_AXES, "series": series,
                                   "references": refs})
    shown = data["panels"]
    if not shown:
        raise UserError("none of the runs logged anything to plot")
    cols = min(columns, len(shown))
    rows = math.ceil(len(shown) / cols)
    n_legend = len(groups) + len({label for refs in references.values() for label, _ in refs})
    ncol = min(n_legend, 4)
    legend_inches = 0.15 + 0.22 * math.ceil(n_legend / ncol)
    height = 3.6 * rows + legend_inches
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, height), squeeze=False)
    colors = {label: f"C{i % 10}" for i, (label, _) in enumerate(groups)}
    ref_styles = [("black", "--"), ("C7", ":"), ("C8", "-."), ("C9", (0, (6, 2, 1, 2, 1, 2))), ("C6", (0, (1, 3)))]
    ref_labels = list(dict.fromkeys(r["label"] for p in shown for r in p["references"]))
    handles = {}
    for ax, panel in zip(axes.flat, shown):
        for s in panel["series"]:
            color = colors[s["label"]]
            few = len(s["iters"]) < 30
            (line,) = ax.plot(s["iters"], s["mean"], color=color, label=s["label"], marker="." if few else None,
                              lw=1.4)
            if s["runs"] > 1:
                ax.fill_between(s["iters"], s["lo"], s["hi"], color=color, alpha=0.18, lw=0)
            handles.setdefault(s["label"], line)
        for r in panel["references"]:
            color, style = ref_styles[ref_labels.index(r["label"]) % len(ref_styles)]
            line = ax.axhline(r["value"], color=color, ls=style, lw=1.4, label=r["label"])
            handles.setdefault(r["label"], line)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if panel["log"]:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.MaxNLocator(6))  # a narrow log range still gets labelled ticks
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:.3g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=ncol, fontsize=9,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    data["references"] = references
    return fig, data


def plot_runs(groups, out, panels=PANELS, references=None, title=None):
    """Write the figure to OUT (PNG) and the data it shows to OUT with .json in place of .png; returns OUT."""
    import matplotlib.pyplot as plt

    fig, data = figure(groups, panels, references, title)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    return out


def main(argv=None):
    p = cli.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", help="main.py --out_dir folders, or folders of them (seeds)")
    p.add_argument("--out", default="", help="PNG path (default: RUN_DIR/curves.png of the first run)")
    args = p.parse_args(argv)
    groups = [(os.path.basename(os.path.normpath(d)), run_dirs_of(d)) for d in args.run_dirs]
    out = args.out or os.path.join(args.run_dirs[0], "curves.png")
    print(plot_runs(groups, out))


if __name__ == "__main__":
    cli.run(main)
