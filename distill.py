"""Knowledge distillation from a frozen dense teacher (METHOD.md §6).

    loss = hardness_task · CE + hardness_kldiv · KL + hardness_squarehead · SquareHead   (weights not normalised)

The full-vocabulary logits are the memory hog: (B·T) × 50257 fp32 values per model, plus their softmaxes.
So both models only return their final features here, and lm_head is applied to chunks of tokens whose
gradients are formed right away (model.FusedLMHeadLoss): a chunk's logits are freed before the next chunk,
and peak memory grows with chunk_size × vocab instead of B·T × vocab.

The teacher is a `Teacher`: a GPT frozen at construction, in eval mode for good, run under no_grad. The
Distiller (a plain object, not an nn.Module) holds it, so it is never a submodule of the student, never moves
with student.to(), never lands in the student's checkpoint and is never wrapped in DDP.
"""
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cli import REPO_ROOT, UserError
from model import GPT, FusedLMHeadLoss, GPTConfig, default_chunk_size

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Teacher(GPT):
    """A GPT that cannot learn: no gradients, eval mode that .train() cannot undo, no targets, no autograd graph."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # A parent's .train(), or a training loop's blanket model.train(), must never turn dropout back on.
        return super().train(False)

    @torch.no_grad()
    def forward(self, idx, targets=None, return_hidden=False, features_only=False):
        if targets is not None:
            raise ValueError("the teacher takes no targets: it only provides features and logits")
        return super().forward(idx, return_hidden=return_hidden, features_only=features_only)


def load_teacher(name_or_path, device="cpu", dtype="float32", block_size=None) -> Teacher:
    """Load a local Hugging Face GPT-2 folder as a frozen Teacher on device, stored in dtype (a TEACHER_DTYPES key)."""
    if dtype not in TEACHER_DTYPES:
        raise UserError(f"teacher dtype {dtype!r} is not one of {', '.join(TEACHER_DTYPES)}")
    teacher = Teacher.from_pretrained(name_or_path, block_size=block_size)
    return teacher.to(device=device, dtype=TEACHER_DTYPES[dtype])


def unwrap(model):
    """The GPT inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if inner is None:
            return model
        model = inner


# ---------------------------------------------------------------------------------------------- loss terms
def kl_per_token(student_logits, teacher_logits, temperature):
    """KL(teacher ‖ student) of softmax(logits / τ) for each row, summed over the vocabulary, in fp32."""
    if teacher_logits.requires_grad:  # a teacher that learns too: let autograd differentiate both sides
        # Upcast first: a 50k-way softmax of bf16 logits (autocast, or a bf16 teacher) loses too much precision.
        log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    return _KLPerToken.apply(student_logits, teacher_logits, temperature)


class _KLPerToken(torch.autograd.Function):
    """The same KL with its closed-form gradient, d KL / d student_logits = (p_s − p_t) / τ (p = softmax(· / τ)).

    The autograd chain of log_softmax and kl_div makes about twelve passes and temporaries of (tokens ×
    vocabulary) in forward and backward; this makes seven, in place where the tensors are its own. Same values
    (kl_div's exp(log_t) · (log_t − log_s), element by element), same gradient up to rounding.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        # Upcast first: a 50k-way softmax of bf16 logits (autocast, or a bf16 teacher) loses too much precision.
        log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        p_t = log_t.exp()
        kl = log_t.sub_(log_s).mul_(p_t).sum(-1)
        ctx.save_for_backward(log_s, p_t)
        ctx.temperature, ctx.student_dtype = temperature, student_logits.dtype
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        log_s, p_t = ctx.saved_tensors
        grad_student = log_s.exp().sub_(p_t).mul_(grad.unsqueeze(-1) / ctx.temperature)
        return grad_student.to(ctx.student_dtype), None, None


def kl_div_loss(student_logits, teacher_logits, temperature=2.0):
    """Forward KL averaged over tokens, times τ² (Hinton et al.: keeps the gradient scale independent of τ)."""
    V = student_logits.size(-1)
    kl = kl_per_token(student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), temperature)
    return kl.mean() * temperature ** 2


def squarehead_loss(student_hidden, teacher_hidden, eps=1e-6):
    """Sum over blocks of mean((h_s − h_t)²) / (mean(h_t²) + eps): an MSE normalised per block, so that deep
    blocks with large activations do not drown out the early ones."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"SquareHead needs one teacher block per student block, "
                         f"got {len(teacher_hidden)} and {len(student_hidden)}")
    loss = 0.0
    for hs, ht in zip(student_hidden, teacher_hidden):
        hs, ht = hs.float(), ht.float()
        loss = loss + (hs - ht).pow(2).mean() / (ht.pow(2).mean() + eps)
    return loss


def _chunk_sums(x, head, targets, teacher_x, teacher_head, temperature):
    """CE sum and unscaled KL sum over one chunk of tokens: the body checkpoint recomputes in backward."""
    logits = F.linear(x, head).float()
    ce = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
    if teacher_x is None:
        return ce, None
    with torch.no_grad():
        teacher_logits = F.linear(teacher_x, teacher_head)
    # Multiply by the mask instead of indexing with it: boolean indexing would synchronise a GPU every chunk.
    kl = (kl_per_token(logits, teacher_logits, temperature) * (targets != -1)).sum()
    return ce, kl


def chunked_ce_and_kl(x, head, targets, teacher_x=None, teacher_head=None, temperature=2.0, chunk_size=1024):
    """Mean CE and τ²·mean KL over the tokens whose target is not -1, from final features applied to lm_head.

    x: student features (N, C); head: the student's lm_head weight (V, C); targets: (N,), -1 = ignore.
    teacher_x (N, C_t) and teacher_head (V, C_t): give both for KL, else KL is None and never computed.
    chunk_size: tokens per chunk (0 = model.default_chunk_size): only one chunk's logits live at a time, and
    their gradients are formed in the forward pass (model.FusedLMHeadLoss), so nothing of size N × V is kept for
    backward.
    None: one chunk through plain autograd, the reference for tests and the benchmark.
    """
    if chunk_size is None:
        ce, kl = _chunk_sums(x, head, targets, teacher_x, teacher_head, temperature)
        n_tokens = (targets != -1).sum().clamp(min=1)
        return ce / n_tokens, (None if kl is None else kl / n_tokens * temperature ** 2)
    if chunk_size == 0:
        chunk_size = _auto_chunk(x)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or head.requires_grad)
    if teacher_x is not None and teacher_x.requires_grad:  # a teacher that learns too: plain autograd per chunk
        return _checkpointed_chunks(x, head, targets, teacher_x, teacher_head, temperature, chunk_size)
    ce, kl, _ = FusedLMHeadLoss.apply(x, head, targets, teacher_x, teacher_head, temperature, chunk_size, need_grad,
                                      None)
    return ce, (None if teacher_x is None else kl)


def weighted_ce_and_kl(x, head, targets, teacher_x, teacher_head, temperature, chunk_size, w_ce, w_kl):
    """(w_ce·CE + w_kl·τ²·KL, CE, KL) as chunked_ce_and_kl computes them, with one gradient for the weighted
    sum (the logit gradients of both terms added before the lm_head GEMMs: half their cost); CE and KL are
    returned detached, for the log. Falls back to chunked_ce_and_kl where the fused path does not apply."""
    if chunk_size is None or (teacher_x is not None and teacher_x.requires_grad):
        ce, kl = chunked_ce_and_kl(x, head, targets, teacher_x, teacher_head, temperature, chunk_size)
        loss = w_ce * ce + (w_kl * kl if kl is not None else 0.0)
        return loss, ce.detach(), None if kl is None else kl.detach()
    chunk_size = chunk_size or _auto_chunk(x)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or head.requires_grad)
    ce, kl, loss = FusedLMHeadLoss.apply(x, head, targets, teacher_x, teacher_head, temperature, chunk_size, need_grad,
                                    (float(w_ce), float(w_kl)))
    return loss, ce, (None if teacher_x is None else kl)


def _auto_chunk(x):
    return default_chunk_size(x.device, x.shape[-1], with_kl=True)


def _checkpointed_chunks(x, head, targets, teacher_x, teacher_head, temperature, chunk_size):
    n_tokens = (targets != -1).sum().clamp(min=1)
    ce_sum, kl_sum = 0.0, 0.0
    for xc, tc, txc in zip(x.split(chunk_size), targets.split(chunk_size), teacher_x.split(chunk_size)):
        ce, kl = checkpoint(_chunk_sums, xc, head, tc, txc, teacher_head, temperature, use_reentrant=False)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    return ce_sum / n_tokens, kl_sum / n_tokens * temperature ** 2


# ---------------------------------------------------------------------------------------------- the objective
class Distiller:
    """The training objective: `loss, parts = distiller(student, x, y)` in place of `_, loss = student(x, y)`.

    parts holds detached tensors for the log: "ce" always (the student's own loss, also what validation
    reports), "kl" and "squarehead" only when their weight is non-zero (a zero-weight term is not computed).
    """

    def __init__(self, teacher, student_config: GPTConfig, hardness_task=0.33, hardness_kldiv=0.67,
                 hardness_squarehead=0.0, temperature=2.0, chunk_size=0):
        weights = dict(hardness_task=hardness_task, hardness_kldiv=hardness_kldiv,
                       hardness_squarehead=hardness_squarehead)
        for name, w in weights.items():
            if not w >= 0:  # also catches NaN
                raise UserError(f"{name} must be >= 0, got {w}")
        if not any(weights.values()):
            raise UserError("hardness_task, hardness_kldiv and hardness_squarehead are all 0: nothing to train on")
        if not temperature > 0:
            raise UserError(f"distillation temperature must be > 0, got {temperature}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 0):
            raise UserError(f"distillation chunk_size must be a number of tokens (0 = auto), got {chunk_size}")
        self.hardness_task = hardness_task
        self.hardness_kldiv = hardness_kldiv
        self.hardness_squarehead = hardness_squarehead
        self.temperature, self.chunk_size = temperature, chunk_size
        self.uses_teacher = hardness_kldiv > 0 or hardness_squarehead > 0
        if self.uses_teacher and teacher is None:
            raise UserError("hardness_kldiv or hardness_squarehead is > 0 but no teacher was given")
        if teacher is not None:
            check_teacher(teacher, student_config, squarehead=hardness_squarehead > 0)
        # Held here, never by the student: an nn.Module attribute would make it a submodule.
        self.teacher = teacher if self.uses_teacher else None

    def __call__(self, student, x, y):
        """student may be DDP-wrapped: its forward always goes through the wrapper so gradients synchronise."""
        want_sq = self.hardness_squarehead > 0
        out = student(x, features_only=True, return_hidden=want_sq)
        feats, hidden = out if want_sq else (out, None)
        t_feats = t_hidden = None
        if self.uses_teacher:
            with torch.no_grad():
                t_out = self.teacher(x, features_only=True, return_hidden=want_sq)
            t_feats, t_hidden = t_out if want_sq else (t_out, None)

        want_kl = self.hardness_kldiv > 0
        loss, ce, kl = weighted_ce_and_kl(
            feats.reshape(-1, feats.size(-1)), unwrap(student).lm_head.weight, y.reshape(-1),
            t_feats.reshape(-1, t_feats.size(-1)) if want_kl else None,
            self.teacher.lm_head.weight if want_kl else None, self.temperature, self.chunk_size,
            self.hardness_task, self.hardness_kldiv)
        sq = squarehead_loss(hidden, t_hidden) if want_sq else None
        if want_sq:
            loss = loss + self.hardness_squarehead * sq
        parts = {k: t.detach() for k, t in (("ce", ce), ("kl", kl), ("squarehead", sq)) if t is not None}
        return loss, parts


def check_teacher(teacher, student_config: GPTConfig, squarehead=False):
    """Fail at construction, not mid-training, when the teacher cannot teach this student."""
    if not isinstance(teacher, Teacher):
        raise TypeError(f"the teacher must be a frozen Teacher (use load_teacher), got {type(teacher).__name__}")
    t, s = teacher.config, student_config
    if t.vocab_size != s.vocab_size:
        raise UserError(f"teacher vocabulary ({t.vocab_size} tokens) differs from the student's ({s.vocab_size}): "
                        f"distillation compares logits token by token, so use a teacher with the same tokenizer")
    if t.block_size < s.block_size:
        raise UserError(f"teacher context {t.block_size} is shorter than the student's block_size {s.block_size}")
    if squarehead and (t.n_layer, t.n_embd) != (s.n_layer, s.n_embd):
        raise UserError(f"SquareHead distillation compares block outputs one to one and needs a teacher of the "
                        f"student's depth and width: teacher {t.n_layer} layers × {t.n_embd}, student "
                        f"{s.n_layer} × {s.n_embd}; set hardness_squarehead to 0 (KL works across sizes) "
                        f"or use a teacher of the student's size")


# ---------------------------------------------------------------------------------------------- memory benchmark
def measure_loss_peak_memory(chunk_size, batch_size=1, seq_len=1024, vocab_size=50257, n_layer=2, n_head=2,
                             n_embd=64, hardness=(0.33, 0.67, 0.0), device="cpu", fresh_process=True) -> dict:
    """Peak memory (MiB) of one distillation loss forward + backward, above what was in use just before it.

    A tiny model with the full vocabulary makes the logits dominate. On CUDA the allocator's peak statistics
    are exact. On CPU the peak resident set size is used: VmHWM, reset through /proc/self/clear_refs (Linux),
    else ru_maxrss. fresh_process runs the measurement in a new interpreter, so earlier peaks and memory
    cached by the allocator from earlier variants do not count (use it on CPU).
    """
    kwargs = dict(chunk_size=chunk_size, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd, hardness=list(hardness), device=device)
    if fresh_process:
        code = ("import json, sys, distill; "
                "print(json.dumps(distill.measure_loss_peak_memory(**json.loads(sys.argv[1]), fresh_process=False)))")
        # A fixed mmap threshold makes glibc return every freed tensor buffer to the OS at once; otherwise
        # freed chunk-sized buffers linger in the heap and the RSS overstates what is live.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory measurement failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=seq_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    student, teacher = GPT(cfg).to(device), Teacher(cfg).to(device)
    h_task, h_kl, h_sq = hardness
    distiller = Distiller(teacher, cfg, hardness_task=h_task, hardness_kldiv=h_kl, hardness_squarehead=h_sq,
                          chunk_size=chunk_size)
    x = torch.randint(vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(vocab_size, (batch_size, seq_len), device=device)
    gc.collect()
    before, method = _start_peak_tracking(device)
    t0 = time.perf_counter()
    loss, _ = distiller(student, x, y)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _peak_since_start(device, method)
    return dict(kwargs, peak_mib=round((peak - before) / 2 ** 20, 1), seconds=round(seconds, 3), method=method,
                loss=round(loss.item(), 4))


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _start_peak_tracking(device):
    """(bytes in use now, how the peak will be read)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        return _proc_status_bytes("VmRSS"), "VmHWM"
    except OSError:
        # ru_maxrss cannot be reset: right only if nothing earlier in this process peaked higher.
        return _ru_maxrss_bytes(), "ru_maxrss"


def _peak_since_start(device, method):
    if method == "cuda.max_memory_allocated":
        return torch.cuda.max_memory_allocated()
    if method == "VmHWM":
        return _proc_status_bytes("VmHWM")
    return _ru_maxrss_bytes()


def _ru_maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
