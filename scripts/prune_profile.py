"""Where prune.py's Wanda (or SparseGPT) spends its CPU against the published procedure, by operator (torch.profiler self time).

    python scripts/prune_profile.py [--method wanda|sparsegpt] [--blocks 3] [--windows 8] [--window 512]
        [--tokens_per_forward 512 4096]

A random model of SmolLM2-135M's block shapes (bench_real.SMOLLM2_135M, cut to --blocks blocks), one thread, the
same calibration windows for every run: prune.prune_model with prune.CPU_TOKENS_PER_FORWARD set to each value
given (4096 = eight windows of 512 per forward, the loop before the cap), then bench_real.published_prune. Each run
once untimed first, then once under the profiler; prints the operators' self milliseconds side by side.
"""
import copy
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_real  # noqa: E402
import cli  # noqa: E402
import prune  # noqa: E402


def self_ms(fn, model):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(model)
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt"))
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--tokens_per_forward", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--rows", type=int, default=12, help="operators shown, by their largest self time")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dense = bench_real.build_model(dict(bench_real.SMOLLM2_135M, num_hidden_layers=args.blocks)).eval()
    tokens = torch.randint(dense.config.vocab_size, (args.windows, args.window),
                           generator=torch.Generator().manual_seed(0))

    def ours(cap):
        def run(model):
            prune.CPU_TOKENS_PER_FORWARD = cap
            prune.prune_model(model, args.method, tokens=tokens, batch_size=args.windows, progress=False)
        return run

    runs = {f"ours, {cap} tokens/forward": ours(cap) for cap in args.tokens_per_forward}
    runs["published"] = lambda model: bench_real.published_prune(model, args.method, tokens)
    for fn in runs.values():  # warm-up
        fn(copy.deepcopy(dense))
    tables = {name: self_ms(fn, copy.deepcopy(dense)) for name, fn in runs.items()}
    ops = sorted(set().union(*tables.values()), key=lambda op: -max(t.get(op, 0.0) for t in tables.values()))
    print(f"self CPU ms, {args.method} 2:4, {args.blocks} blocks of SmolLM2-135M's shapes, {args.windows} x {args.window} "
          f"tokens, one thread")
    print(f"{'operator':52s}" + "".join(f"{name:>28s}" for name in tables))
    for op in ops[:args.rows]:
        print(f"{op[:52]:52s}" + "".join(f"{t.get(op, 0.0):28.0f}" for t in tables.values()))
    print(f"{'all operators':52s}" + "".join(f"{sum(t.values()):28.0f}" for t in tables.values()))


if __name__ == "__main__":
    cli.run(main)
