"""Draw a run's metrics.jsonl (loss, val loss, WikiText-2 ppl, lr, λ, flip ratio) to a PNG.

    python plot.py out/ast_boosted [out/other_run ...] [--out curves.png]
"""
import json
import os

import cli
from cli import UserError

PANELS = [("loss", "train loss"), ("val_loss", "C4 val loss"), ("wikitext_ppl", "WikiText-2 ppl"),
          ("lr", "learning rate"), ("lambda", "SR-STE λ"), ("flip_ratio", "mask flip ratio")]


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
    return {k: (sorted(v), [v[i] for i in sorted(v)]) for k, v in series.items()}


def plot_runs(run_dirs, out, panels=PANELS, labels=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(d) for d in run_dirs]
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for series, label in zip(runs, labels):
            if key in series:
                ax.plot(*series[key], label=label, marker="." if len(series[key][0]) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if key == "wikitext_ppl":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = cli.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", help="main.py --out_dir folders")
    p.add_argument("--out", default="", help="PNG path (default: RUN_DIR/curves.png of the first run)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run_dirs[0], "curves.png")
    print(plot_runs(args.run_dirs, out))


if __name__ == "__main__":
    cli.run(main)
