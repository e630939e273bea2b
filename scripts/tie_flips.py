"""Which mask changes of a training run sit in N:M groups that were tied at the boundary in the dense weights
(docs/ties.md, "The mask-update spike on a real model").

    python scripts/tie_flips.py out/spike/change/ckpt.pt out/smollm2/model.safetensors

Reads a main.py checkpoint (its masks and the step-0 masks it keeps as init_mask) and the dense model's
safetensors; a group is tied when its n-th and (n+1)-th largest |W| are equal (2:4: the 2nd and 3rd). Prints the
share of groups tied in the dense weights, the share whose mask changed since step 0, and the share of the
changed ones that were tied.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from checkpoint import unpack_masks  # noqa: E402
from sparsity import boundary_ties  # noqa: E402


def main(argv=None):
    from safetensors.torch import load_file

    p = cli.ArgumentParser(prog="tie_flips.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a main.py ckpt.pt of a run with --change_mask True")
    p.add_argument("dense", help="the dense model's model.safetensors (the run's starting weights)")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    args = p.parse_args(argv)
    state = unpack_masks(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"])
    dense = load_file(args.dense)
    tied = changed = tied_changed = total = 0
    for key in [k for k in state if k.endswith(".init_mask")]:
        layer = key[:-len(".init_mask")]
        suffix = layer.split("model.", 1)[-1] + ".weight"  # hf.model.layers.0.q_proj -> layers.0.q_proj.weight
        name = next((k for k in dense if k.endswith(suffix)), None)
        if name is None:
            raise cli.UserError(f"{args.dense} has no weight for {layer}: pass the run's starting model")
        t = boundary_ties(dense[name].float().abs(), args.n, args.m)
        c = (state[layer + ".mask"] != state[key]).reshape(t.shape[0], -1, args.m).any(-1)
        tied, changed, tied_changed, total = tied + t.sum().item(), changed + c.sum().item(), \
            tied_changed + (t & c).sum().item(), total + t.numel()
    if not total:
        raise cli.UserError(f"{args.checkpoint} holds no step-0 masks (init_mask): a sparse main.py run's checkpoint")
    print(f"{total:,} groups: tied at the {args.n}:{args.m} boundary in the dense weights {tied / total:.4f}; "
          f"mask changed since step 0 {changed / total:.4f}; of the changed, tied {tied_changed / max(changed, 1):.4f}")


if __name__ == "__main__":
    cli.run(main)
