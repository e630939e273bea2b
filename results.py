"""Collect the evaluation JSON of several runs into the paper's tables (Markdown, and optionally JSON).

    python results.py --label Dense=out/dense.json --label SparseGPT=out/sparsegpt.json out/gmp out/ast_naive
    python results.py --label Dense=out/zs_dense.json --label AST=out/zs_ast.json      # zeroshot.py --out files

Reads main.py's results.json (give the file or its out_dir), prune.py --results files, evaluate.py --out and
zeroshot.py --out files. A row is named by its --label NAME=PATH, else by its folder (results.json) or file
name. Rows appear in the order given: --label rows first, then the plain paths. The first table (perplexity)
lists every run except zero-shot-only files; runs with zero-shot results (zeroshot.py, main.py
--zeroshot_tasks) also make the paper's second table: Parameters (non-zero weights) and acc per task.
What a row says about the model (its pattern, SLoRB, non-zero parameters) is what the evaluated model itself
was (evaluate.sparsity_report), never the flags of the run; only the training procedure (AST, GMP, IMP,
distillation, SR-STE) comes from the run's config.

The paper's layout (methods as rows, models as columns, WikiText-2 perplexity in the cells) comes from labels
METHOD@MODEL, e.g. `--label SparseGPT@OPT-125M=out/opt125m/sparsegpt.json`; rows and columns keep the order in
which their first label appears, and a cell no run fills is "–".
"""
import json
import os

import cli
from cli import UserError

COLUMNS = ("method", "training", "WikiText-2 ppl", "C4 val loss", "tokens", "sparsity / N:M", "parameters")
# The paper's second table: zeroshot.py's task names and the paper's column names, in the paper's order.
ZEROSHOT_COLUMNS = (("boolq", "BoolQ"), ("rte", "RTE"), ("hellaswag", "HellaSwag"), ("winogrande", "WinoGrande"),
                    ("arc_easy", "ARC-e"), ("arc_challenge", "ARC-c"), ("openbookqa", "OBQA"))


def read_run(path):
    """The JSON dict of a run: a file, or a folder holding results.json."""
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"{file} not found: pass a results JSON (main.py results.json, prune.py --results, "
                        "evaluate.py --out) or a main.py out_dir")
    try:
        with open(file) as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(run, dict):
        raise UserError(f"{file} does not hold a JSON object of results")
    return file, run


def default_label(path, file):
    if os.path.isdir(path) or os.path.basename(file) == "results.json":
        return os.path.basename(os.path.dirname(os.path.abspath(file)))
    return os.path.splitext(os.path.basename(file))[0]


def training_of(run):
    """'yes (...)' for main.py runs, 'no (method)' for prune.py, '–' when the JSON does not say (evaluate.py)."""
    if "config" in run and isinstance(run["config"], dict):  # main.py
        cfg = run["config"]
        if cfg.get("mode") == "dense":
            what = ["dense"]
        else:
            what = [{"gradual": "GMP", "iterative": "IMP"}.get(cfg.get("prune_schedule"), "AST")]
        if cfg.get("distill_model"):
            what.append("distill")
        if (run["slorb_k"] if "slorb_k" in run else cfg.get("SLoRB")):  # the model's (older files: the flag)
            what.append("SLoRB")
        if cfg.get("srste_decay"):
            what.append("SR-STE")
        return f"yes ({' + '.join(what)})"
    if run.get("training") is False or "method" in run:  # prune.py
        return f"no ({run.get('method', 'one-shot')}{' + reconstruction' if run.get('reconstruct') else ''})"
    return "–"


def pattern_of(run):
    if run.get("pattern"):  # the evaluated model's own layers (older files: prune.py's flags)
        return run["pattern"]
    cfg = run.get("config") or {}
    if "N" in cfg and "M" in cfg:
        return f"{cfg['N']}:{cfg['M']}"
    return "N:M"


def sparsity_cell(run):
    share = run.get("mean_sparsity")
    if not run.get("sparse_layers"):
        return "dense"
    pct = f"{100 * share:.1f} %" if share is not None else "?"
    slorb = f" + SLoRB k={run['slorb_k']}" if run.get("slorb_k") else ""
    if run.get("nm_ok") is True:
        return f"{pattern_of(run)} ✓ ({pct}){slorb}"
    if run.get("nm_ok") is False:
        return f"{pattern_of(run)} ✗ NOT N:M ({pct}){slorb}"
    return f"{pattern_of(run) if run.get('pattern') else 'unstructured'} ({pct}){slorb}"


def params_cell(run):
    """Non-zero parameters (the paper's "Parameters") and the share of all parameters stored dense."""
    nonzero = run.get("params_nonzero")
    if nonzero is None:
        return "–"
    share = run.get("dense_param_share")
    return human_tokens(nonzero) + (f" ({100 * share:.1f} % dense)" if share is not None and run.get("sparse_layers")
                                    else "")


def human_tokens(n):
    if n is None:
        return "–"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def ppl_cell(run):
    ppl = run.get("wikitext_ppl")
    if ppl is None:
        return "–"
    windows = run.get("ppl_windows")
    # a partial evaluation is not comparable with the paper's numbers: say so in the cell
    return f"{ppl:.2f}" + (f" ({windows} windows)" if windows else "")


def human_params(n):
    """Three significant digits, as the paper writes 6.7B and 3.4B."""
    if n is None:
        return "–"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}" if n / scale < 100 else f"{n / scale:.0f}{suffix}"
    return str(n)


def zeroshot_cells(run):
    """The second table's cells of a run with zero-shot results (acc in %, * = approximate HellaSwag)."""
    z = run["zeroshot"]
    tasks = z.get("tasks", {})
    cells = {}
    for key, column in ZEROSHOT_COLUMNS:
        row = tasks.get(key)
        cells[column] = "–" if row is None else f"{100 * row['acc']:.2f}" + ("*" if row.get("approximate") else "")

    def mean_cell(keys):
        accs = [tasks[k]["acc"] for k in keys if k in tasks]
        if not accs:
            return "–", None
        star = "*" if any(tasks[k].get("approximate") for k in keys if k in tasks) else ""
        shown = f" ({len(accs)} of {len(keys)})" if len(accs) < len(keys) else ""
        return f"{100 * sum(accs) / len(accs):.2f}{star}{shown}", sum(accs) / len(accs)

    keys = [k for k, _ in ZEROSHOT_COLUMNS]
    cells["Mean"], mean = mean_cell(keys)
    cells["Mean w/o HellaSwag"], mean_rest = mean_cell([k for k in keys if k != "hellaswag"])
    cells["Parameters"] = human_params(run.get("params_nonzero"))
    return cells, mean, mean_rest


def collect(labelled, paths):
    """One row dict per run: the tables' cells plus the raw numbers."""
    rows = []
    for label, path in [*labelled, *((None, p) for p in paths)]:
        file, run = read_run(path)
        zs = {}
        if isinstance(run.get("zeroshot"), dict):
            cells, mean, mean_rest = zeroshot_cells(run)
            limit = run["zeroshot"].get("limit")
            zs = {"zeroshot_cells": cells, "zeroshot_mean": mean, "zeroshot_mean_without_hellaswag": mean_rest,
                  "zeroshot_limit": limit, "zeroshot": run["zeroshot"].get("tasks"),
                  "params_nonzero": run.get("params_nonzero"), "harness": run["zeroshot"].get("harness")}
        rows.append({**zs,
            "method": label or default_label(path, file), "training": training_of(run),
            "WikiText-2 ppl": ppl_cell(run),
            "C4 val loss": f"{run['val_loss']:.4f}" if run.get("val_loss") is not None else "–",
            "tokens": human_tokens(run.get("tokens")), "sparsity / N:M": sparsity_cell(run),
            "parameters": params_cell(run), "params_nonzero": run.get("params_nonzero"),
            "slorb_k": run.get("slorb_k"), "family": run.get("family"),
            "source": file, "wikitext_ppl": run.get("wikitext_ppl"), "ppl_windows": run.get("ppl_windows"),
            "val_loss": run.get("val_loss"), "tokens_raw": run.get("tokens"), "nm_ok": run.get("nm_ok"),
            "mean_sparsity": run.get("mean_sparsity"),
        })
    return rows


def markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def first_table_rows(rows):
    """Every run but a zero-shot-only file (no perplexity, no validation loss): that one has no cells here."""
    return [r for r in rows if not (r.get("zeroshot_cells") and r["wikitext_ppl"] is None and r["val_loss"] is None)]


def zeroshot_markdown(rows):
    """The paper's second table, with what every number is underneath."""
    columns = ["Models", "Parameters", *(c for _, c in ZEROSHOT_COLUMNS), "Mean", "Mean w/o HellaSwag"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        name = row["method"] + (f" (first {row['zeroshot_limit']} per task)" if row["zeroshot_limit"] else "")
        cells = {"Models": name, **row["zeroshot_cells"]}
        lines.append("| " + " | ".join(cells[c] for c in columns) + " |")
    harnesses = ", ".join(sorted({r["harness"] for r in rows if r.get("harness")})) or "lm-evaluation-harness"
    lines += ["", f"0-shot acc (unnormalised, the metric of AST's and Wanda's tables) in %, {harnesses}; "
              "Parameters: non-zero weights; Mean: over the task columns a run has."]
    if any("*" in row["zeroshot_cells"]["HellaSwag"] for row in rows):
        lines.append("* HellaSwag from the approximate fallback file (other preprocessing than the harness's, "
                     "see zeroshot/hellaswag/PROVENANCE.md): not harness-exact, and so is any mean that includes it.")
    return "\n".join(lines)


def paper_table(rows):
    """Markdown of the paper's layout from rows labelled METHOD@MODEL: | Method | Training | MODEL ... |.

    A cell is the run's WikiText-2 perplexity (with its window count when partial); a run that is not exactly
    N:M says so in its cell. Training is the first run's of the method that says it (main.py and prune.py
    results do, evaluate.py's do not; the same recipe in every column)."""
    methods, models, cells, training = [], [], {}, {}
    for row in rows:
        method, _, model = row["method"].rpartition("@")
        if not method:
            continue
        methods += [method] if method not in methods else []
        models += [model] if model not in models else []
        cell = row["WikiText-2 ppl"] + (" ✗ NOT N:M" if row["nm_ok"] is False else "")
        cells[method, model] = cell
        if training.get(method, "–") == "–":  # an evaluate.py JSON does not say how its model was made
            training[method] = row["training"]
    lines = ["| Method | Training | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for method in methods:
        lines.append(f"| {method} | {training[method]} | "
                     + " | ".join(cells.get((method, model), "–") for model in models) + " |")
    return "\n".join(lines)


def parse_label(spec):
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UserError(f"--label expects NAME=PATH, got {spec!r}")
    return name, path


def main(argv=None):
    p = cli.ArgumentParser(prog="results.py", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", help="results JSON files or main.py out_dirs (row named by folder/file)")
    p.add_argument("--label", action="append", default=[], metavar="NAME=PATH", help="a row named NAME")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    labelled = [parse_label(spec) for spec in args.label]
    if not labelled and not args.paths:
        raise UserError("no runs given: pass results files or folders, or --label NAME=PATH")
    rows = collect(labelled, args.paths)
    first, zeroshot = first_table_rows(rows), [r for r in rows if r.get("zeroshot_cells")]
    table = "\n\n".join(([markdown(first)] if first else []) + ([zeroshot_markdown(zeroshot)] if zeroshot else []))
    print(table)
    if any("@" in name for name, _ in labelled):
        table = paper_table(rows)
        print("\n" + table)
    if args.json:
        cli.write_json(args.json, rows)
    return table, rows


if __name__ == "__main__":
    cli.run(main)
