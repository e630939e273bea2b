"""N:M sparsity for any nn.Module: masks, the sparse linear layer (STE + SLoRB), SR-STE, and the swap.

Nothing here knows about GPT-2 except the default filter's layer names. The contract with the rest of the
project: a sparse layer (SparseLinear, or SparseExpertWeight for a mixture-of-experts weight [experts, out, in])
keeps its dense fp32 weight W and a bool buffer `mask` M of W's shape; its forward uses W ⊙ M and hands the
gradient of W ⊙ M to all of W (straight-through); masks are recomputed from scores on demand. N:M groups always
run along the last (input) dimension.

Sharded (FSDP2, parallelize.py): W is a DTensor of whole rows and `mask` holds the rows of this rank's shard
only. N:M groups and the per-row unstructured masks lie along a row, so scores, masks and the SR-STE decay are
computed on the local shard with no communication (`local()` below); a per-layer mask (unstructured_layer)
gathers the layer's scores to choose (SparseLinear.layer_mask). The forward, where FSDP has gathered the full W,
needs the full mask, which parallelize.py gathers into `gathered_mask` for the duration of the block's forward.
"""
import contextlib
import functools
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

METRICS = ("magnitude", "wanda")
MASK_TYPES = ("structured", "unstructured", "unstructured_layer")
SLORB_INITS = ("mean", "sum", "xavier", "zero")
TIE_RULES = ("high", "low")  # which of two equal scores an N:M group keeps: the higher or the lower input index
GPT2_BLOCK_LINEARS = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")


# ----------------------------------------------------------------------------------------------- masks
def check_pattern(n: int, m: int, in_features: int = None):
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"invalid N:M pattern {n}:{m}: need 0 < N <= M (e.g. 2:4)")
    if in_features is not None and in_features % m != 0:
        raise ValueError(f"input dimension {in_features} is not divisible by M={m}")


def _keep_top(scores: torch.Tensor, k: int, ties: str = "low") -> torch.Tensor:
    """Bool mask keeping the k largest entries along the last dim; ties go to the lower index (ties='low') or
    the higher (ties='high')."""
    if ties == "high":
        return _keep_top(scores.flip(-1), k).flip(-1)
    # A stable descending sort keeps equal scores in index order, so the lower index wins a tie.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :k], True)


def _keep_top_by_rank(groups: torch.Tensor, n: int, ties: str = "low") -> torch.Tensor:
    """_keep_top for groups (G, m) of a few finite scores, without sorting: an element is kept when fewer than
    n elements of its group beat it, and of two equal scores the lower index wins (ties='low', as the stable
    sort) or the higher (ties='high').

    m(m-1)/2 vectorised comparisons of whole columns (6 for 2:4): several times faster than torch.sort on
    millions of 4-element rows, and never a loop over groups.
    """
    m = groups.shape[-1]
    beats = torch.ge if ties == "high" else torch.gt
    # With w(i, j) = [s_j > s_i] for i < j (a tie goes to i, the lower index; >= gives it to j), element i is
    # beaten by sum_{j>i} w(i, j) + sum_{j<i} (1 - w(j, i)) = i + lead_i elements, and kept when that is below n.
    lead = [None] * m
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = beats(groups[:, j], groups[:, i]).view(torch.int8)
            lead[i] = j_wins.clone() if lead[i] is None else lead[i].add_(j_wins)
            lead[j] = -j_wins if lead[j] is None else lead[j].sub_(j_wins)
    keep = torch.empty_like(groups, dtype=torch.bool)
    for i in range(m):
        if lead[i] is None:  # m == 1
            keep[:, i] = n > i
        else:
            torch.lt(lead[i], n - i, out=keep[:, i])
    return keep


# Below this many groups nm_mask sorts (on one CPU thread, 576 x 4 scores: 74 us sorted against 211 us by rank;
# the two cross near 1,500 groups).
RANK_PATH_MIN_GROUPS = 1024


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4, ties: str = "high") -> torch.Tensor:
    """N:M mask: in every group of m consecutive elements along the last (input) dim, keep the n largest; of two
    equal scores the higher input index is kept (ties='high', the default) or the lower (ties='low').

    Ties are common where weights sit on a grid (a model dequantised from 4 bits: 15 % of SmolLM2's 2:4 groups
    tie at the boundary), and the rule alone moves one-shot magnitude perplexity by almost 2x there: 'high'
    measured best of the rules tried (docs/ties.md, "Ties at the N:M boundary")."""
    check_pattern(n, m, scores.shape[-1])
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}: choose one of {', '.join(TIE_RULES)}")
    groups = scores.reshape(-1, m)
    # Comparisons order NaN differently from torch.sort (which puts it first): only finite scores take the
    # fast path; a non-finite sum (NaN, inf or overflow) sends the tensor to the sort. Few groups (SparseGPT's
    # one group of columns of a layer at a time) sort faster than the comparisons' many small operators.
    if m <= 8 and len(groups) >= RANK_PATH_MIN_GROUPS and bool(torch.isfinite(groups.sum())):
        return _keep_top_by_rank(groups, n, ties).reshape(scores.shape)
    return _keep_top(groups, n, ties).reshape(scores.shape)


def boundary_ties(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """(..., in/m) bool: the group's n-th and (n+1)-th largest scores are equal, so the tie rule alone decides
    which of them nm_mask keeps."""
    top = scores.reshape(*scores.shape[:-1], -1, m).sort(dim=-1, descending=True).values
    return top[..., n - 1] == top[..., n]


def partial_nm_mask(scores: torch.Tensor, n: int, m: int, fraction: float, ties: str = "high") -> torch.Tensor:
    """Prune only `fraction` of what the N:M mask prunes: the lowest-scoring of those weights in the tensor.

    fraction 0 keeps everything, 1 is exactly nm_mask; in between, every group still keeps at least n
    (the gradual and iterative magnitude pruning baselines ramp it from 0 to 1).
    """
    full = nm_mask(scores, n, m, ties)
    if fraction >= 1.0:
        return full
    k = int(round(fraction * int((~full).sum())))
    mask = torch.ones_like(full)
    if k > 0:
        candidates = scores.masked_fill(full, float("inf")).reshape(-1)
        lowest = torch.sort(candidates, stable=True).indices[:k]
        mask.view(-1)[lowest] = False
    return mask


def pruning_fraction(step: int, schedule: str, start: int, end: int, rounds: int = 1) -> float:
    """Fraction of the N:M-pruned weights that the GMP/IMP baselines have pruned after `step` steps.

    gradual (Zhu & Gupta): 1 - (1 - p)^3 with p = (step - start) / (end - start), clipped to [0, 1].
    iterative: r / rounds after the r-th of `rounds` equally spaced pruning steps (the last at `end`).
    """
    if schedule == "gradual":
        p = min(max((step - start) / (end - start), 0.0), 1.0)
        return 1.0 - (1.0 - p) ** 3
    if schedule == "iterative":
        if rounds == 1:
            return 1.0 if step >= end else 0.0
        spacing = (end - start) / (rounds - 1)
        done = sum(1 for r in range(rounds) if step >= start + round(r * spacing))
        return done / rounds
    raise ValueError(f"unknown pruning schedule {schedule!r}: choose gradual or iterative")


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep the largest (1 - sparsity) fraction per output row (scope='row', the published meaning) or per layer."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "row":
        return _keep_top(scores, scores.shape[-1] - int(round(scores.shape[-1] * sparsity)))
    if scope == "layer":
        flat = scores.reshape(-1)
        return _keep_top(flat, flat.numel() - int(round(flat.numel() * sparsity))).reshape(scores.shape)
    raise ValueError(f"unknown scope {scope!r}: choose row or layer")


def local(t):
    """The local shard of a DTensor (what this rank stores and updates), any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2, with ||X_j||_2 the L2 norm of input channel j over the calibration tokens
    (for expert weights [experts, out, in], input_norm is [experts, in]: each expert's own tokens)."""
    return weight.abs() * input_norm.to(weight.dtype).unsqueeze(-2)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of m consecutive inputs holding more than n non-zeros (0 means the tensor is N:M)."""
    check_pattern(n, m, weight.shape[-1])
    nonzero = (weight != 0).reshape(-1, m).sum(-1)
    return int((nonzero > n).sum())


class _MaskedWeight(torch.autograd.Function):
    """W ⊙ M forward; backward hands the gradient of W ⊙ M to every entry of W (straight-through)."""

    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ----------------------------------------------------------------------------------------------- layers
class MaskedLayer:
    """The masks of one sparse weight W (..., out, in), whatever holds it: a SparseLinear's (out, in) or a
    mixture-of-experts' (experts, out, in). Bool `mask` / `init_mask` of W's shape; Wanda's Σ x_j² per input
    channel (per expert) in `input_sq`; scores, mask computation and updates along the last dimension.
    """
    ties = "high"  # N:M tie rule (nm_mask); sparsify() sets it per layer

    def _init_masks(self, n, m, metric, mask_type, sparsity, ste, device):
        if metric not in METRICS:
            raise ValueError(f"unknown mask metric {metric!r}: choose one of {', '.join(METRICS)}")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"unknown mask type {mask_type!r}: choose one of {', '.join(MASK_TYPES)}")
        shape = self.weight.shape
        if mask_type == "structured":
            check_pattern(n, m, shape[-1])
        self.n, self.m, self.metric, self.mask_type, self.sparsity = n, m, metric, mask_type, sparsity
        self.sparse, self.ste = True, ste
        self.gathered_mask = None  # the full mask during a sharded forward (parallelize.py); else `mask` is full
        self.shard_rows = slice(None)  # which rows of W this rank holds (parallelize.shard_masks)
        full = torch.ones(shape, dtype=torch.bool, device=device)
        self.register_buffer("mask", full)
        self.register_buffer("init_mask", full.clone())
        # Sum over calibration tokens of x_j², filled by collect_input_norms(); Wanda's ||X_j||² (not trained).
        self.register_buffer("input_sq", torch.zeros(*shape[:-2], shape[-1], dtype=torch.float32, device=device))

    def masked_weight(self):
        """W ⊙ M with the straight-through gradient (W when dense; plain W ⊙ M without STE)."""
        mask = self.mask if self.gathered_mask is None else self.gathered_mask
        if not self.sparse:
            return self.weight
        return _MaskedWeight.apply(self.weight, mask) if self.ste else self.weight * mask

    def effective_weight(self):
        """W ⊙ M as stored (this rank's rows when sharded)."""
        w = local(self.weight)
        return w * self.mask if self.sparse else w

    def scores(self):
        w = local(self.weight).detach().float()
        if self.metric == "wanda":
            if not bool(self.input_sq.any()):
                raise RuntimeError("Wanda scores need input statistics: run calibration under "
                                   "collect_input_norms(model) first")
            norms = self.input_sq.sqrt()  # per expert: only this rank's experts
            return wanda_scores(w, norms[self.shard_rows] if norms.dim() > 1 else norms)
        return magnitude_scores(w)

    @torch.no_grad()
    def compute_mask(self):
        s = self.scores()
        if self.mask_type == "structured":
            return nm_mask(s, self.n, self.m, self.ties)
        if self.mask_type == "unstructured":
            return unstructured_mask(s, self.sparsity, "row")
        return self.layer_mask(s)

    def layer_mask(self, scores):
        """unstructured_layer: the top (1 - sparsity) of the whole layer. Sharded (FSDP2), this rank holds some
        rows only, and a choice from them would differ from one process's: the layer's scores are gathered, the
        whole layer's mask chosen as one process would, and this rank keeps its rows of it."""
        w = self.weight
        if not hasattr(w, "full_tensor"):
            return unstructured_mask(scores, self.sparsity, "layer")
        from torch.distributed.tensor import DTensor, Replicate
        mesh, rows = w.device_mesh, w.placements
        whole = DTensor.from_local(scores, mesh, rows, shape=w.shape, stride=w.stride()).full_tensor()
        mask = unstructured_mask(whole, self.sparsity, "layer")
        return DTensor.from_local(mask, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, rows).to_local()

    @torch.no_grad()
    def init_mask_and_slorb(self):
        """Set the initial mask from the current weights, then initialise SLoRB from the pruned weights."""
        self.mask.copy_(self.compute_mask())
        self.init_mask.copy_(self.mask)
        if self.slorb_S is not None:
            self.reset_slorb()

    @torch.no_grad()
    def update_mask(self, mask=None):
        """Recompute the mask (or set the given one); returns (flipped since last, flipped since initial) tensors."""
        new = self.compute_mask() if mask is None else mask.to(torch.bool)
        flipped = torch.count_nonzero(new != self.mask)  # count_nonzero: a bool .sum() is 5x slower on CPU
        since_init = torch.count_nonzero(new != self.init_mask)
        self.mask.copy_(new)
        return flipped, since_init


class SparseLinear(MaskedLayer, nn.Linear):
    """nn.Linear with a bool mask buffer and an optional SLoRB low-rank residual.

    y = x (W ⊙ M)ᵀ + b [+ (x Xᵀ) Sᵀ with SLoRB], X: (in/k, in) projection, S: (out, in/k).
    `sparse = False` gives the dense forward (used for calibration and as a sanity switch).
    `ste = False` gives plain masked training (no gradient to pruned weights), as GMP/IMP baselines use.
    """

    def __init__(self, in_features, out_features, bias=True, n=2, m=4, metric="magnitude",
                 mask_type="structured", sparsity=0.5, slorb_k=0, slorb_init="mean", trainable_projection=False,
                 ste=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_masks(n, m, metric, mask_type, sparsity, ste, device)
        self.slorb_k, self.slorb_init, self.trainable_projection = slorb_k, slorb_init, trainable_projection
        self.slorb_S = None
        self.register_buffer("slorb_X", None)
        if slorb_k:
            if slorb_init not in SLORB_INITS:
                raise ValueError(f"unknown SLoRB init {slorb_init!r}: choose one of {', '.join(SLORB_INITS)}")
            if in_features % slorb_k:
                raise ValueError(f"SLoRB k={slorb_k} does not divide the input dimension {in_features}")
            groups = in_features // slorb_k
            self.slorb_S = nn.Parameter(torch.zeros(out_features, groups, device=device, dtype=dtype))
            # The projection exists as a tensor only when it is trained or not a block indicator (xavier);
            # a fixed indicator needs no GEMM: ΔW = S X just repeats S over each group of k inputs.
            if trainable_projection or slorb_init == "xavier":
                X = block_indicator(groups, slorb_k, device=device, dtype=dtype)
                if trainable_projection:
                    del self._buffers["slorb_X"]
                    self.slorb_X = nn.Parameter(X)
                else:
                    self.slorb_X = X

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """Wrap an existing nn.Linear, reusing its weight and bias Parameters (no copy)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def extra_repr(self):
        pattern = f"{self.n}:{self.m}" if self.mask_type == "structured" else f"{self.mask_type} {self.sparsity}"
        s = f"{super().extra_repr()}, {pattern}, metric={self.metric}"
        return s + (f", SLoRB k={self.slorb_k}" if self.slorb_k else "")

    def forward(self, x):
        return F.linear(x, self.forward_weight(), self.bias)

    def forward_weight(self):
        """The weight the forward multiplies by: W ⊙ M (W when dense), plus SLoRB's ΔW = S X.

        x (W⊙M)ᵀ + (x Xᵀ) Sᵀ = x (W⊙M + S X)ᵀ: adding ΔW to the weight costs one pass over the weight instead
        of three thin GEMMs and an add over the activations, whatever the number of tokens.
        """
        w = self.masked_weight()
        if self.slorb_S is None:
            return w
        if self.slorb_X is not None:
            return w + self.slorb_S @ self.slorb_X
        # fixed block-indicator X: ΔW repeats S[i, j] over the k inputs of group j (a broadcast, no GEMM)
        groups = w.view(self.out_features, -1, self.slorb_k) + self.slorb_S.unsqueeze(-1)
        return groups.view(self.out_features, self.in_features)

    def slorb_project(self, x):
        """x Xᵀ: the sum of each group of k consecutive inputs (or the learned projection)."""
        if self.slorb_X is not None:
            return F.linear(x, self.slorb_X)
        return x.reshape(*x.shape[:-1], -1, self.slorb_k).sum(-1)

    def slorb_delta(self):
        """ΔW = S X, the dense (out, in) weight SLoRB adds; zeros without SLoRB."""
        if self.slorb_S is None:
            return torch.zeros_like(self.weight)
        X = self.slorb_X if self.slorb_X is not None else block_indicator(
            self.in_features // self.slorb_k, self.slorb_k, device=self.weight.device, dtype=self.weight.dtype)
        return self.slorb_S @ X

    @torch.no_grad()
    def reset_slorb(self):
        groups, k = self.in_features // self.slorb_k, self.slorb_k
        pruned = (local(self.weight) * ~self.init_mask).reshape(-1, groups, k).sum(-1)
        S = local(self.slorb_S)
        if self.slorb_init == "mean":  # each group's weight sum equals the dense sum
            S.copy_(pruned / k)
        elif self.slorb_init == "sum":
            S.copy_(pruned)
        else:
            S.zero_()
        if self.slorb_X is not None:
            if self.slorb_init == "xavier":
                nn.init.xavier_uniform_(self.slorb_X)
            else:
                self.slorb_X.copy_(block_indicator(groups, k, device=self.slorb_X.device, dtype=self.slorb_X.dtype))


class SparseExpertWeight(MaskedLayer, nn.Module):
    """One mixture-of-experts projection [experts, out, in] made sparse: N:M along `in`, for every expert.

    transformers (>= 5) holds a layer's experts as 3-D Parameters of one module (e.g. `mlp.experts.gate_up_proj`)
    whose forward indexes them (`self.gate_up_proj[e]`) or hands them whole to a grouped GEMM. sparsify() moves
    such a Parameter into this module, under the same attribute name, and gives the experts module a class whose
    forward reads the attribute as `forward_weight()`, W ⊙ M: the model's own expert forward then runs on masked
    weights.
    The router stays dense. SLoRB does not apply (sparsify refuses it): a dense low-rank residual per expert
    is not part of AST and its size grows with the number of experts.
    """
    slorb_S = slorb_X = None
    slorb_k, slorb_init, trainable_projection = 0, "mean", False
    bias = None

    def __init__(self, weight: nn.Parameter, n=2, m=4, metric="magnitude", mask_type="structured", sparsity=0.5,
                 ste=True, slorb_k=0, **unused):
        super().__init__()
        if slorb_k:
            raise ValueError("SLoRB does not apply to mixture-of-experts weights: use --SLoRB False for this model")
        self.weight = weight
        self.num_experts, self.out_features, self.in_features = weight.shape
        self._init_masks(n, m, metric, mask_type, sparsity, ste, weight.device)

    def extra_repr(self):
        pattern = f"{self.n}:{self.m}" if self.mask_type == "structured" else f"{self.mask_type} {self.sparsity}"
        return f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, {pattern}"

    forward_weight = MaskedLayer.masked_weight

    def slorb_delta(self):
        return torch.zeros_like(self.weight)


class _ReadsSparseExpertWeights:
    """Mixed into an experts module's class: during its forward, an attribute holding a SparseExpertWeight reads as
    its W ⊙ M. Outside the forward it is the module (what named_modules, get_submodule and torch's state-dict
    utilities expect)."""

    def forward(self, *args, **kwargs):
        self.__dict__["_reading_masked"] = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__["_reading_masked"] = False

    def __getattr__(self, name):
        value = super().__getattr__(name)
        if isinstance(value, SparseExpertWeight) and self.__dict__.get("_reading_masked"):
            return value.forward_weight()
        return value


@functools.lru_cache(maxsize=None)
def _reading_sparse_weights(cls):
    if issubclass(cls, _ReadsSparseExpertWeights):
        return cls
    return type(cls.__name__, (_ReadsSparseExpertWeights, cls), {"__module__": cls.__module__})


def expert_weights(model: nn.Module):
    """(name, experts module, attribute) of every mixture-of-experts weight still dense in the model: a 3-D
    Parameter [experts, out, in] of a module holding `num_experts` experts, as transformers >= 5 stores them."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        for attr, p in module.named_parameters(recurse=False):
            if isinstance(experts, int) and p.dim() == 3 and p.shape[0] == experts:
                found.append((f"{name}.{attr}" if name else attr, module, attr))
    return found


def block_indicator(groups, k, device=None, dtype=None):
    """(groups, groups*k) matrix whose row i sums inputs [i*k, (i+1)*k): SLoRB's initial projection X."""
    eye = torch.eye(groups, device=device, dtype=dtype or torch.float32)
    return eye.repeat_interleave(k, dim=1)


# ----------------------------------------------------------------------------------------------- model level
def sparse_layers(model: nn.Module):
    """(name, layer) pairs of a model's sparse layers (SparseLinear, SparseExpertWeight), in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MaskedLayer)]


def gpt2_block_linears(name: str, module: nn.Module) -> bool:
    """Default filter: the four linears of each GPT-2 block (never embeddings or lm_head)."""
    return isinstance(module, nn.Linear) and bool(GPT2_BLOCK_LINEARS.search(name))


def _swap_expert_weight(module, attr, name, **kwargs):
    """Move the experts module's Parameter `attr` into a SparseExpertWeight under the same name (see there)."""
    if getattr(module, "is_transposed", False):
        raise ValueError(f"{name}: the experts are stored [experts, in, out] (is_transposed) and N:M groups run "
                         "along the input dimension, which must be the last: this layout is not supported")
    layer = SparseExpertWeight(module._parameters[attr], **kwargs)
    del module._parameters[attr]
    module.__class__ = _reading_sparse_weights(type(module))
    module.add_module(attr, layer)


def sparsify(model: nn.Module, n=2, m=4, metric="magnitude", filter_fn=gpt2_block_linears,
             mask_type="structured", sparsity=0.5, slorb_k=0, slorb_init="mean", trainable_projection=False,
             ste=True, calibrate=None, init_masks=True, ties="high"):
    """Swap every nn.Linear selected by filter_fn(name, module) for a SparseLinear, and every mixture-of-experts
    weight selected by filter_fn(name, parameter) for a SparseExpertWeight, in place.

    With init_masks, masks are set from the current weights right away (else they start all-ones); Wanda needs
    `calibrate`, a function calibrate(model) that runs forward passes over calibration data (masks are off while
    it runs, so the statistics come from the dense model). Returns the list of swapped names.
    """
    if ties not in TIE_RULES:  # before anything is swapped
        raise ValueError(f"unknown tie rule {ties!r}: choose one of {', '.join(TIE_RULES)}")
    linears = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear and filter_fn(name, mod)]
    experts = [(name, mod, attr) for name, mod, attr in expert_weights(model)
               if filter_fn(name, mod._parameters[attr])]
    if not linears and not experts:
        raise ValueError("no nn.Linear matched the filter; pass filter_fn=lambda name, module: ... for this model")
    args = dict(n=n, m=m, metric=metric, mask_type=mask_type, sparsity=sparsity, slorb_k=slorb_k, ste=ste)
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            layer = SparseLinear.from_linear(linear, slorb_init=slorb_init, trainable_projection=trainable_projection,
                                             **args)
        except ValueError as e:  # name the layer whose width does not fit
            raise ValueError(f"{name}: {e}") from None
        setattr(parent, child, layer)
    for name, module, attr in experts:
        try:
            _swap_expert_weight(module, attr, name, **args)
        except ValueError as e:
            raise ValueError(e if str(e).startswith(name) else f"{name}: {e}") from None
    swapped = {name for name, _ in linears} | {name for name, _, _ in experts}
    for name, layer in sparse_layers(model):
        if name in swapped:
            layer.ties = ties
    if init_masks:
        if metric == "wanda":
            if calibrate is None:
                raise ValueError("metric='wanda' needs calibrate=fn(model) that runs the calibration data")
            with collect_input_norms(model):
                calibrate(model)
        for _, layer in sparse_layers(model):
            layer.init_mask_and_slorb()
    return [name for name, _ in sparse_layers(model) if name in swapped]


@contextlib.contextmanager
def dense_forward(model: nn.Module):
    """Temporarily run every sparse layer densely (W instead of W ⊙ M)."""
    layers = [layer for _, layer in sparse_layers(model)]
    saved = [layer.sparse for layer in layers]
    for layer in layers:
        layer.sparse = False
    try:
        yield model
    finally:
        for layer, s in zip(layers, saved):
            layer.sparse = s


class _ExpertInputs(TorchFunctionMode):
    """Sees every F.linear of the forwards run inside; those whose weight is one expert's slice W[e] of a dense
    SparseExpertWeight's W (the experts' eager loop) report their input to fn(layer, x, e)."""

    def __init__(self, layers, fn):
        super().__init__()
        self.owner = {id(layer.weight): layer for layer in layers}
        self.fn = fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) > 1 and args[1]._base is not None:
            base = args[1]._base
            layer = self.owner.get(id(base))
            if layer is not None:
                expert = (args[1].storage_offset() - base.storage_offset()) // base.stride(0)
                x = args[0].detach()
                self.fn(layer, x.reshape(-1, x.shape[-1]), expert)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _eager_experts(model: nn.Module):
    """Switch transformers' experts modules to their eager per-expert loop (from a grouped GEMM) meanwhile."""
    configs = {id(mod.config): mod.config for mod in model.modules()
               if isinstance(mod, _ReadsSparseExpertWeights) and hasattr(getattr(mod, "config", None),
                                                                       "_experts_implementation")}
    saved = {key: config._experts_implementation for key, config in configs.items()}
    for config in configs.values():
        config._experts_implementation = "eager"
    try:
        yield
    finally:
        for key, config in configs.items():
            config._experts_implementation = saved[key]


@contextlib.contextmanager
def observe_inputs(model: nn.Module, fn):
    """Call fn(layer, x, expert) with each input x (tokens, in) a sparse layer of `model` multiplies in the dense
    forwards run inside (under dense_forward): expert is None for a SparseLinear, the expert's index for a
    SparseExpertWeight, whose experts then run their eager loop, one F.linear per expert."""
    def linear_hook(layer, inputs):
        x = inputs[0].detach()
        fn(layer, x.reshape(-1, x.shape[-1]), None)

    layers = [layer for _, layer in sparse_layers(model)]
    handles = [layer.register_forward_pre_hook(linear_hook) for layer in layers if isinstance(layer, SparseLinear)]
    experts = [layer for layer in layers if isinstance(layer, SparseExpertWeight)]
    try:
        with contextlib.ExitStack() as stack:
            if experts:
                stack.enter_context(_eager_experts(model))
                stack.enter_context(_ExpertInputs(experts, fn))
            yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def collect_input_norms(model: nn.Module):
    """Reset and accumulate Σ x_j² of every sparse layer's input (per expert for expert weights), on the dense
    model.

    A fused QKV projection is one layer, so Q, K and V share one statistic, as in Wanda.
    """
    def accumulate(layer, x, expert):
        sq = x.float().pow(2).sum(0)
        (layer.input_sq if expert is None else layer.input_sq[expert]).add_(sq)

    for _, layer in sparse_layers(model):
        layer.input_sq.zero_()
    with dense_forward(model), torch.no_grad(), observe_inputs(model, accumulate):
        yield model


@torch.no_grad()
def update_masks(model: nn.Module, all_reduce_sum=None):
    """Recompute every mask from the current weights. Returns (flip_ratio, flip_ratio_since_initial).

    all_reduce_sum: for a sharded model, a function summing a tensor over the ranks, so that the ratios are the
    whole model's (each rank recomputes and counts only its own rows).
    """
    counts = None
    for _, layer in sparse_layers(model):
        f, s = layer.update_mask()
        row = torch.stack([f, s, torch.tensor(layer.mask.numel(), device=f.device)]).double()
        counts = row if counts is None else counts + row
    if counts is None:
        return 0.0, 0.0
    if all_reduce_sum is not None:
        counts = all_reduce_sum(counts)
    flipped, since_init, total = counts.tolist()  # one host sync for all layers
    return (flipped / total, since_init / total) if total else (0.0, 0.0)


@torch.no_grad()
def check_nm(model: nn.Module, n=None, m=None):
    """Verify every structured sparse layer's effective weight W ⊙ M is exactly N:M (n kept per group).

    Returns (ok, rows); rows hold each layer's name, pattern, sparsity of the effective weight and verdict.
    n, m default to each layer's own pattern.
    """
    rows, ok = [], True
    for name, layer in sparse_layers(model):
        w = layer.effective_weight()
        row = {"layer": name, "sparsity": float((w == 0).float().mean()), "mask_type": layer.mask_type}
        if layer.mask_type == "structured":
            ln, lm = n or layer.n, m or layer.m
            kept = layer.mask.reshape(-1, lm).sum(-1)
            row["pattern"] = f"{ln}:{lm}"
            row["nm_ok"] = bool((kept == ln).all()) and nm_violations(w, ln, lm) == 0
            ok = ok and row["nm_ok"]
        rows.append(row)
    return ok, rows


def layer_args(layer: MaskedLayer) -> dict:
    """The sparsify() keyword arguments that rebuild this layer (stored in checkpoints)."""
    return dict(n=layer.n, m=layer.m, metric=layer.metric, mask_type=layer.mask_type, sparsity=layer.sparsity,
                slorb_k=layer.slorb_k, slorb_init=layer.slorb_init,
                trainable_projection=layer.trainable_projection, ste=layer.ste, ties=layer.ties)


# ----------------------------------------------------------------------------------------------- SR-STE
def srste_lambda(step: int, srste_decay: float, increase_step: int) -> float:
    """Annealed SR-STE strength: linear ramp 0 → srste_decay over increase_step steps, then constant."""
    if increase_step <= 0 or step >= increase_step:
        return srste_decay
    return srste_decay * step / increase_step


class SRSTEAdamW(torch.optim.Optimizer):
    """AdamW with the SR-STE decay d = λ · (¬M ⊙ W) on the weights of sparse layers.

    variant='paper' (AST): the first moment m tracks the loss gradient only; u = m̂ + d; the second moment
    is built from u²; the step is u / (sqrt(v̂) + eps). variant='classic' (SR-STE): d is added to the
    gradient, then standard AdamW. Parameters without a mask get plain AdamW either way. λ lives in each
    param group as 'srste_lambda' (set it every step, as the LR). Decoupled weight decay as in AdamW.

    Each update is a few torch._foreach_* operations over a batch of tensors: on GPUs one multi-tensor kernel
    per operation over up to FOREACH_ELEMENTS elements (which bounds the temporaries); on CPU, where _foreach
    ops loop over the tensors anyway, a batch is one tensor, so temporaries are freed and their memory reused
    at once (a batch of fresh multi-megabyte temporaries costs more in page faults than it saves).
    """

    FOREACH_ELEMENTS = 2 ** 25  # GPUs: elements per multi-tensor batch
    CPU_FOREACH_ELEMENTS = 0  # CPU: one tensor per batch (a test raises it to run the GPUs' batching on a CPU)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, variant="paper",
                 masked_modules=()):
        if variant not in ("paper", "classic"):
            raise ValueError(f"unknown SR-STE optimizer variant {variant!r}: choose paper or classic")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, srste_lambda=0.0)
        super().__init__(params, defaults)
        self.variant = variant
        # weight Parameter -> the module whose `mask` buffer belongs to it (read at every step: masks change)
        self._owner = {layer.weight: layer for layer in masked_modules}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            for batch in self._batches(params):
                self._update(batch, group)
        return loss

    def _batches(self, params):
        """Lists of tensors on one device at the same step (so with the same bias corrections), each of at most
        FOREACH_ELEMENTS elements on GPUs (a larger tensor is a batch of its own), of CPU_FOREACH_ELEMENTS (one
        tensor) on CPU."""
        by_step = {}
        for p in params:
            by_step.setdefault((self.state[p]["step"], p.device), []).append(p)
        for (_, device), batch_params in by_step.items():
            limit = self.FOREACH_ELEMENTS if device.type == "cuda" else self.CPU_FOREACH_ELEMENTS
            batch, size = [], 0
            for p in batch_params:
                if batch and size + p.numel() > limit:
                    yield batch
                    batch, size = [], 0
                batch.append(p)
                size += p.numel()
            if batch:
                yield batch

    def _update(self, params, group):
        beta1, beta2 = group["betas"]
        lr, eps, wd, lam = group["lr"], group["eps"], group["weight_decay"], group["srste_lambda"]
        t = self.state[params[0]]["step"]
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        owners = [self._owner.get(p) for p in params]
        # Sharded parameters (DTensors) are updated through their local shards, as are their states.
        m = [local(self.state[p]["exp_avg"]) for p in params]
        v = [local(self.state[p]["exp_avg_sq"]) for p in params]
        grads = [local(p.grad) for p in params]
        params = [local(p) for p in params]
        # ¬M of the weights that get the decay d = λ·(¬M ⊙ W); d is taken from W before this step's weight decay
        pruned = [~o.mask if (o is not None and lam != 0) else None for o in owners]
        if self.variant == "classic":  # d is added to the gradient, then standard AdamW
            grads = [g if nm is None else torch.addcmul(g, p, nm, value=lam)
                     for g, p, nm in zip(grads, params, pruned)]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        # The tensor the second moment is built from and the one the step follows: for the paper's masked
        # weights both are u = m̂ + d; for every other tensor the gradient and m (m̂ through the step size).
        paper = [i for i, o in enumerate(owners) if o is not None and self.variant == "paper"]
        second, numerator = list(grads), list(m)
        step_size = [-lr * math.sqrt(bc2) / bc1] * len(params)
        if paper:
            u = torch._foreach_div([m[i] for i in paper], bc1)
            for ui, i in zip(u, paper):
                if pruned[i] is not None:
                    ui.addcmul_(params[i], pruned[i], value=lam)
                second[i] = numerator[i] = ui
                step_size[i] = -lr * math.sqrt(bc2)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, second, second, value=1 - beta2)
        # sqrt(v / bc2) + eps = (sqrt(v) + eps·sqrt(bc2)) / sqrt(bc2): the sqrt(bc2) moves into the step size
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps * math.sqrt(bc2))
        torch._foreach_addcdiv_(params, numerator, denom, step_size)
