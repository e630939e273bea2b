"""Benchmark: C4 prepare throughput (tokens/s) with --num_proc 1 and 2 on the shared data samples.

    python data/bench_prepare.py [--num_proc 1 2] [--repeat 1]

Tokenises every shared web-text sample (C4, FineWeb, WebText: about 7.3M tokens) into a temporary folder.
"""
import glob
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import cli  # noqa: E402
from cli import UserError  # noqa: E402
from data.c4_dataset import prepare  # noqa: E402
from data.tokenizer import get_gpt2_encoding  # noqa: E402


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="runs per setting; the fastest is reported")
    args = p.parse_args(argv)
    root = cli.default_data_root()
    inputs = sorted(glob.glob(os.path.join(root, "c4", "en", "*.json.gz"))
                    + glob.glob(os.path.join(root, "fineweb", "*.json.gz"))
                    + glob.glob(os.path.join(root, "webtext", "*.json.gz")))
    if not inputs:
        raise UserError(f"no *.json.gz samples under {root}/c4/en, fineweb, webtext (set SPARSE_GPT2_DATA)")
    get_gpt2_encoding()  # load once, outside the timed runs
    print(f"{len(inputs)} input files: {', '.join(os.path.basename(f) for f in inputs)}")
    for num_proc in args.num_proc:
        best = None
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as out_dir:
                argv = [a for f in inputs for a in ("--input", f)] + [
                    "--out_dir", out_dir, "--val_fraction", "0.005", "--num_proc", str(num_proc)]
                t0 = time.perf_counter()
                meta = prepare.main(argv)
                seconds = time.perf_counter() - t0
            tokens = sum(s["tokens"] for s in meta["splits"].values())
            best = seconds if best is None else min(best, seconds)
        print(f"BENCH num_proc={num_proc}: {tokens:,} tokens in {best:.2f} s = {tokens / best:,.0f} tokens/s "
              f"(end to end: read, tokenise, write, sha256)")


if __name__ == "__main__":
    cli.run(main)
