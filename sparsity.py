"""N:M sparsity for any nn.Module: masks, the sparse linear layer (STE + SLoRB), SR-STE, and the swap.

Nothing here knows about GPT-2 except the default filter's layer names. The contract with the rest of the
project: a SparseLinear keeps its dense fp32 weight W and a bool buffer `mask` M; its forward uses W ⊙ M and
hands the gradient of W ⊙ M to all of W (straight-through); masks are recomputed from scores on demand.

Sharded (FSDP2, parallelize.py): W is a DTensor of whole rows and `mask` holds the rows of this rank's shard
only. N:M groups and the per-row unstructured masks lie along a row, so scores, masks and the SR-STE decay are
computed on the local shard with no communication (`local()` below); a per-layer mask (unstructured_layer)
gathers the layer's scores to choose (SparseLinear.layer_mask). The forward, where FSDP has gathered the full W,
needs the full mask, which parallelize.py gathers into `gathered_mask` for the duration of the block's forward.
"""
import contextlib
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

METRICS = ("magnitude", "wanda")
MASK_TYPES = ("structured", "unstructured", "unstructured_layer")
SLORB_INITS = ("mean", "sum", "xavier", "zero")
GPT2_BLOCK_LINEARS = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")


# ----------------------------------------------------------------------------------------------- masks
def check_pattern(n: int, m: int, in_features: int = None):
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"invalid N:M pattern {n}:{m}: need 0 < N <= M (e.g. 2:4)")
    if in_features is not None and in_features % m != 0:
        raise ValueError(f"input dimension {in_features} is not divisible by M={m}")


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping the k largest entries along the last dim; ties go to the lower index."""
    # A stable descending sort keeps equal scores in index order, so the lower index wins a tie.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :k], True)


def _keep_top_by_rank(groups: torch.Tensor, n: int) -> torch.Tensor:
    """_keep_top for groups (G, m) of a few finite scores, without sorting: an element is kept when fewer than
    n elements of its group beat it, and of two equal scores the lower index wins (as the stable sort).

    m(m-1)/2 vectorised comparisons of whole columns (6 for 2:4): several times faster than torch.sort on
    millions of 4-element rows, and never a loop over groups.
    """
    m = groups.shape[-1]
    # With w(i, j) = [s_j > s_i] for i < j (a tie goes to i, the lower index), element i is beaten by
    # sum_{j>i} w(i, j) + sum_{j<i} (1 - w(j, i)) = i + lead_i elements, and kept when that is below n.
    lead = [None] * m
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = (groups[:, j] > groups[:, i]).view(torch.int8)
            lead[i] = j_wins.clone() if lead[i] is None else lead[i].add_(j_wins)
            lead[j] = -j_wins if lead[j] is None else lead[j].sub_(j_wins)
    keep = torch.empty_like(groups, dtype=torch.bool)
    for i in range(m):
        if lead[i] is None:  # m == 1
            keep[:, i] = n > i
        else:
            torch.lt(lead[i], n - i, out=keep[:, i])
    return keep


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask: in every group of m consecutive elements along the last (input) dim, keep the n largest."""
    check_pattern(n, m, scores.shape[-1])
    groups = scores.reshape(-1, m)
    # Comparisons order NaN differently from torch.sort (which puts it first): only finite scores take the
    # fast path; a non-finite sum (NaN, inf or overflow) sends the tensor to the sort.
    if m <= 8 and groups.numel() and bool(torch.isfinite(groups.sum())):
        return _keep_top_by_rank(groups, n).reshape(scores.shape)
    return _keep_top(groups, n).reshape(scores.shape)


def partial_nm_mask(scores: torch.Tensor, n: int, m: int, fraction: float) -> torch.Tensor:
    """Prune only `fraction` of what the N:M mask prunes: the lowest-scoring of those weights in the tensor.

    fraction 0 keeps everything, 1 is exactly nm_mask; in between, every group still keeps at least n
    (the gradual and iterative magnitude pruning baselines ramp it from 0 to 1).
    """
    full = nm_mask(scores, n, m)
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
    """Wanda: |W_ij| * ||X_j||_2, with ||X_j||_2 the L2 norm of input channel j over the calibration tokens."""
    return weight.abs() * input_norm.to(weight.dtype).unsqueeze(0)


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


# ----------------------------------------------------------------------------------------------- layer
class SparseLinear(nn.Linear):
    """nn.Linear with a bool mask buffer and an optional SLoRB low-rank residual.

    y = x (W ⊙ M)ᵀ + b [+ (x Xᵀ) Sᵀ with SLoRB], X: (in/k, in) projection, S: (out, in/k).
    `sparse = False` gives the dense forward (used for calibration and as a sanity switch).
    `ste = False` gives plain masked training (no gradient to pruned weights), as GMP/IMP baselines use.
    """

    def __init__(self, in_features, out_features, bias=True, n=2, m=4, metric="magnitude",
                 mask_type="structured", sparsity=0.5, slorb_k=0, slorb_init="mean", trainable_projection=False,
                 ste=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if metric not in METRICS:
            raise ValueError(f"unknown mask metric {metric!r}: choose one of {', '.join(METRICS)}")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"unknown mask type {mask_type!r}: choose one of {', '.join(MASK_TYPES)}")
        if mask_type == "structured":
            check_pattern(n, m, in_features)
        self.n, self.m, self.metric, self.mask_type, self.sparsity = n, m, metric, mask_type, sparsity
        self.sparse, self.ste = True, ste
        self.gathered_mask = None  # the full mask during a sharded forward (parallelize.py); else `mask` is full
        full = torch.ones(out_features, in_features, dtype=torch.bool, device=device)
        self.register_buffer("mask", full)
        self.register_buffer("init_mask", full.clone())
        # Sum over calibration tokens of x_j², filled by collect_input_norms(); Wanda's ||X_j||² (not trained).
        self.register_buffer("input_sq", torch.zeros(in_features, dtype=torch.float32, device=device))
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

    def effective_weight(self):
        """W ⊙ M as stored (this rank's rows when sharded)."""
        w = local(self.weight)
        return w * self.mask if self.sparse else w

    def forward(self, x):
        return F.linear(x, self.forward_weight(), self.bias)

    def forward_weight(self):
        """The weight the forward multiplies by: W ⊙ M (W when dense), plus SLoRB's ΔW = S X.

        x (W⊙M)ᵀ + (x Xᵀ) Sᵀ = x (W⊙M + S X)ᵀ: adding ΔW to the weight costs one pass over the weight instead
        of three thin GEMMs and an add over the activations, whatever the number of tokens.
        """
        mask = self.mask if self.gathered_mask is None else self.gathered_mask
        if not self.sparse:
            w = self.weight
        else:
            w = _MaskedWeight.apply(self.weight, mask) if self.ste else self.weight * mask
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

    # -- masks
    def scores(self):
        w = local(self.weight).detach().float()
        if self.metric == "wanda":
            if not bool(self.input_sq.any()):
                raise RuntimeError("Wanda scores need input statistics: run calibration under "
                                   "collect_input_norms(model) first")
            return wanda_scores(w, self.input_sq.sqrt())
        return magnitude_scores(w)

    @torch.no_grad()
    def compute_mask(self):
        s = self.scores()
        if self.mask_type == "structured":
            return nm_mask(s, self.n, self.m)
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

    @torch.no_grad()
    def update_mask(self, mask=None):
        """Recompute the mask (or set the given one); returns (flipped since last, flipped since initial) tensors."""
        new = self.compute_mask() if mask is None else mask.to(torch.bool)
        flipped = torch.count_nonzero(new != self.mask)  # count_nonzero: a bool .sum() is 5x slower on CPU
        since_init = torch.count_nonzero(new != self.init_mask)
        self.mask.copy_(new)
        return flipped, since_init


def block_indicator(groups, k, device=None, dtype=None):
    """(groups, groups*k) matrix whose row i sums inputs [i*k, (i+1)*k): SLoRB's initial projection X."""
    eye = torch.eye(groups, device=device, dtype=dtype or torch.float32)
    return eye.repeat_interleave(k, dim=1)


# ----------------------------------------------------------------------------------------------- model level
def sparse_layers(model: nn.Module):
    """(name, SparseLinear) pairs of a model, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]


def gpt2_block_linears(name: str, module: nn.Module) -> bool:
    """Default filter: the four linears of each GPT-2 block (never embeddings or lm_head)."""
    return isinstance(module, nn.Linear) and bool(GPT2_BLOCK_LINEARS.search(name))


def sparsify(model: nn.Module, n=2, m=4, metric="magnitude", filter_fn=gpt2_block_linears,
             mask_type="structured", sparsity=0.5, slorb_k=0, slorb_init="mean", trainable_projection=False,
             ste=True, calibrate=None, init_masks=True):
    """Swap every nn.Linear selected by filter_fn(name, module) for a SparseLinear, in place.

    With init_masks, masks are set from the current weights right away (else they start all-ones); Wanda needs `calibrate`, a function
    calibrate(model) that runs forward passes over calibration data (masks are off while it runs, so the
    statistics come from the dense model). Returns the list of swapped names.
    """
    chosen = [(name, mod) for name, mod in model.named_modules()
              if type(mod) is nn.Linear and filter_fn(name, mod)]
    if not chosen:
        raise ValueError("no nn.Linear matched the filter; pass filter_fn=lambda name, module: ... for this model")
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLinear.from_linear(
            linear, n=n, m=m, metric=metric, mask_type=mask_type, sparsity=sparsity, slorb_k=slorb_k,
            slorb_init=slorb_init, trainable_projection=trainable_projection, ste=ste))
    if init_masks:
        if metric == "wanda":
            if calibrate is None:
                raise ValueError("metric='wanda' needs calibrate=fn(model) that runs the calibration data")
            with collect_input_norms(model):
                calibrate(model)
        for _, layer in sparse_layers(model):
            layer.init_mask_and_slorb()
    return [name for name, _ in chosen]


@contextlib.contextmanager
def dense_forward(model: nn.Module):
    """Temporarily run every SparseLinear densely (W instead of W ⊙ M)."""
    layers = [layer for _, layer in sparse_layers(model)]
    saved = [layer.sparse for layer in layers]
    for layer in layers:
        layer.sparse = False
    try:
        yield model
    finally:
        for layer, s in zip(layers, saved):
            layer.sparse = s


@contextlib.contextmanager
def collect_input_norms(model: nn.Module):
    """Reset and accumulate Σ x_j² of every SparseLinear's input through forward hooks, on the dense model.

    A fused QKV projection is one layer, so Q, K and V share one statistic, as in Wanda.
    """
    def hook(layer, inputs):
        x = inputs[0].detach()
        layer.input_sq += x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)

    layers = [layer for _, layer in sparse_layers(model)]
    handles = []
    for layer in layers:
        layer.input_sq.zero_()
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with dense_forward(model), torch.no_grad():
            yield model
    finally:
        for h in handles:
            h.remove()


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


def layer_args(layer: SparseLinear) -> dict:
    """The sparsify() keyword arguments that rebuild this layer (stored in checkpoints)."""
    return dict(n=layer.n, m=layer.m, metric=layer.metric, mask_type=layer.mask_type, sparsity=layer.sparsity,
                slorb_k=layer.slorb_k, slorb_init=layer.slorb_init,
                trainable_projection=layer.trainable_projection, ste=layer.ste)


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
