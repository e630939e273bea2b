"""Benchmarks, one named section each: `python bench.py [--only NAME[,NAME...]] [--device cpu] [--out FILE.json]`.

A section is a function (args) -> list of row dicts. Rows are printed as a table per section and, with --out,
saved as JSON {section: rows}. To add one: write the function and give it a name in SECTIONS.
"""
import json
import os

from cli import ArgumentParser, UserError, run


def distill_memory(args):
    """Peak memory of the distillation loss (B=1, T=1024, GPT-2 vocabulary; 2 layers × 64 wide, so the logits
    dominate), forward + backward, chunked vs the plain full-logits loss; each variant in a fresh process."""
    from distill import measure_loss_peak_memory

    rows = []
    for chunk_size in (None, 1024, 256, 64):  # None first: the reference the ratios are taken against
        r = measure_loss_peak_memory(chunk_size, device=args.device)
        reference = rows[0]["peak_mib"] if rows else r["peak_mib"]
        rows.append(dict(variant="unchunked" if chunk_size is None else f"chunks of {chunk_size}",
                         B=r["batch_size"], T=r["seq_len"], vocab=r["vocab_size"],
                         one_fp32_logits_mib=round(r["batch_size"] * r["seq_len"] * r["vocab_size"] * 4 / 2 ** 20, 1),
                         peak_mib=r["peak_mib"],
                         ratio_vs_unchunked=round(r["peak_mib"] / reference, 3), seconds=r["seconds"],
                         loss=r["loss"], method=r["method"]))
    return rows


SECTIONS = {
    "distill_memory": distill_memory,
}


def print_table(name, rows):
    print(f"== {name}")
    if not rows:
        print("(no rows)")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default=None, help="also save the rows as JSON {section: rows} to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise UserError(f"unknown section(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(SECTIONS)}")

    results = {}
    for name in names:
        results[name] = SECTIONS[name](args)
        print_table(name, results[name])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"saved {args.out}")


if __name__ == "__main__":
    run(main)
