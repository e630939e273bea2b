"""Knowledge distillation from a frozen dense teacher (METHOD.md §6), for any model family.

    loss = hardness_task · CE + hardness_kldiv · KL + hardness_squarehead · SquareHead   (weights not normalised)

Both models return only their final features here; loss.lm_head_loss applies each head to chunks of tokens
and forms the gradient of hardness_task · CE + hardness_kldiv · τ²·KL in the same pass, so no full-vocabulary
logits are ever kept. SquareHead compares each block's output.

The teacher is a `Teacher`: a model frozen at construction, in eval mode for good, run under no_grad. The
Distiller (a plain object, not an nn.Module) holds it, so it is never a submodule of the student, never moves
with student.to(), never lands in the student's checkpoint and is never wrapped in DDP.
"""
import torch
import torch.nn as nn

from cli import UserError
from loss import lm_head_loss

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Teacher(nn.Module):
    """A model that cannot learn: no gradients, eval mode that .train() cannot undo, no targets, no autograd graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.eval()

    @property
    def config(self):
        return self.model.config

    @property
    def lm_head(self):
        return self.model.lm_head

    def train(self, mode=True):
        # A parent's .train(), or a training loop's blanket model.train(), must never turn dropout back on.
        return super().train(False)

    @torch.no_grad()
    def forward(self, idx, targets=None, return_hidden=False, features_only=False):
        if targets is not None:
            raise ValueError("the teacher takes no targets: it only provides features and logits")
        return self.model(idx, return_hidden=return_hidden, features_only=features_only)


def load_teacher(name_or_path, device="cpu", dtype="float32", block_size=None) -> Teacher:
    """Any model checkpoint.load_model reads (a Hugging Face folder of any decoder-only model, an export folder or a
    checkpoint), as a frozen Teacher on device, stored in dtype (a TEACHER_DTYPES key)."""
    from checkpoint import load_model

    if dtype not in TEACHER_DTYPES:
        raise UserError(f"teacher dtype {dtype!r} is not one of {', '.join(TEACHER_DTYPES)}")
    model = load_model(name_or_path, block_size=block_size, what="--teacher_model")
    return Teacher(model).to(device=device, dtype=TEACHER_DTYPES[dtype])


def unwrap(model):
    """The model inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if inner is None:
            return model
        model = inner


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


class Distiller:
    """The training objective: `loss, parts = distiller(student, x, y)` in place of `_, loss = student(x, y)`.

    parts holds detached tensors for the log: "ce" always (the student's own loss, also what validation
    reports), "kl" and "squarehead" only when their weight is non-zero (a zero-weight term is not computed).
    chunk_size: tokens per chunk of the fused head loss (0 = loss.default_chunk_size).
    """

    def __init__(self, teacher, student_config, hardness_task=0.33, hardness_kldiv=0.67,
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
        if int(chunk_size) != chunk_size or chunk_size < 0:
            raise UserError(f"distillation chunk_size must be a number of tokens (0 = auto), got {chunk_size}")
        self.hardness_task = hardness_task
        self.hardness_kldiv = hardness_kldiv
        self.hardness_squarehead = hardness_squarehead
        self.temperature, self.chunk_size = temperature, int(chunk_size)
        self.uses_teacher = hardness_kldiv > 0 or hardness_squarehead > 0
        if self.uses_teacher and teacher is None:
            raise UserError("hardness_kldiv or hardness_squarehead is > 0 but no teacher was given")
        if teacher is not None:
            check_teacher(teacher, student_config, squarehead=hardness_squarehead > 0)
        # Held here, never by the student: an nn.Module attribute would make it a submodule.
        self.teacher = teacher if self.uses_teacher else None

    def __call__(self, student, x, y):
        """student may be DDP-wrapped: its forward always goes through the wrapper so gradients synchronise."""
        want_sq, want_kl = self.hardness_squarehead > 0, self.hardness_kldiv > 0
        out = student(x, features_only=True, return_hidden=want_sq)
        feats, hidden = out if want_sq else (out, None)
        t_feats = t_hidden = None
        if self.uses_teacher:
            t_out = self.teacher(x, features_only=True, return_hidden=want_sq)
            t_feats, t_hidden = t_out if want_sq else (t_out, None)

        head, t_head = unwrap(student).lm_head, self.teacher.lm_head if want_kl else None
        loss, ce, kl = lm_head_loss(
            feats.reshape(-1, feats.size(-1)), head.weight, y.reshape(-1), bias=head.bias,
            teacher_x=t_feats.reshape(-1, t_feats.size(-1)) if want_kl else None,
            teacher_weight=t_head.weight if want_kl else None, teacher_bias=t_head.bias if want_kl else None,
            temperature=self.temperature, w_ce=self.hardness_task, w_kl=self.hardness_kldiv,
            chunk_size=self.chunk_size)
        sq = squarehead_loss(hidden, t_hidden) if want_sq else None
        if want_sq:
            loss = loss + self.hardness_squarehead * sq
        parts = {k: t.detach() for k, t in (("ce", ce), ("kl", kl), ("squarehead", sq)) if t is not None}
        return loss, parts


def check_teacher(teacher, student_config, squarehead=False):
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
