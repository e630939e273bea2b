"""distill.py: each loss term against an independent computation, chunking, the frozen teacher, cross-size KL."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cli import UserError
from conftest import save_tiny_gpt2
from distill import Distiller, Teacher, load_teacher, squarehead_loss
from model import GPT, GPTConfig

VOCAB = 101


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("student"))
    save_tiny_gpt2(path, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB, seed=1)
    return path


@pytest.fixture(scope="module")
def deep_teacher_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher4"))
    save_tiny_gpt2(path, n_layer=4, n_head=2, n_embd=48, n_positions=64, vocab_size=VOCAB, seed=2)
    return path


def batch(B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (B, T), generator=g)
    y = torch.randint(VOCAB, (B, T), generator=g)
    return x, y


def perturbed(model, seed=3, scale=0.05):
    """A copy with different weights, so a teacher of the student's shape is not the student itself."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------- pure loss terms
# (CE and KL: tests/test_loss.py)
def kl_reference(student_logits, teacher_logits, tau):
    """Forward KL(teacher ‖ student) of the softened logits, mean over tokens, times τ², by its formula."""
    p_t = F.softmax(teacher_logits / tau, -1)
    return (p_t * (p_t.log() - F.log_softmax(student_logits / tau, -1))).sum(-1).mean() * tau ** 2


def test_squarehead_loss_matches_normalised_mse_summed_over_blocks():
    torch.manual_seed(0)
    hs = [torch.randn(2, 5, 8) for _ in range(3)]
    ht = [torch.randn(2, 5, 8) * (i + 1) for i in range(3)]
    expected = sum(F.mse_loss(a, b) / (F.mse_loss(b, torch.zeros_like(b)) + 1e-6) for a, b in zip(hs, ht))
    assert abs(squarehead_loss(hs, ht).item() - expected.item()) <= 1e-6
    assert squarehead_loss(ht, ht).item() == 0.0


# ---------------------------------------------------------------------------------------------- the Distiller
def test_distiller_loss_is_the_weighted_sum_of_independently_computed_terms(student_dir):
    student = GPT.from_pretrained(student_dir)
    teacher = perturbed(load_teacher(student_dir))
    x, y = batch()
    distiller = Distiller(teacher, student.config, hardness_task=0.3, hardness_kldiv=0.5, hardness_squarehead=0.7,
                          temperature=1.5, chunk_size=5)
    loss, parts = distiller(student, x, y)

    logits, ce, hidden = student(x, y, return_hidden=True)  # the model's own CE path
    t_feats, t_hidden = teacher(x, features_only=True, return_hidden=True)
    kl = kl_reference(logits, teacher.lm_head(t_feats), 1.5)
    sq = squarehead_loss(hidden, t_hidden)
    assert abs(parts["ce"].item() - ce.item()) <= 1e-6
    assert abs(parts["kl"].item() - kl.item()) <= 1e-6
    assert abs(parts["squarehead"].item() - sq.item()) <= 1e-6
    assert abs(loss.item() - (0.3 * ce + 0.5 * kl + 0.7 * sq).item()) <= 1e-6  # weights are not normalised
    assert all(not p.requires_grad for p in parts.values())


def test_distiller_gradients_equal_plain_autograd_of_the_same_objective(student_dir):
    x, y = batch()
    y[0, :3] = -1
    teacher = perturbed(load_teacher(student_dir))
    results = []
    for chunk_size in (7, 0):
        student = GPT.from_pretrained(student_dir)
        d = Distiller(teacher, student.config, hardness_task=0.33, hardness_kldiv=0.67, hardness_squarehead=0.5,
                      chunk_size=chunk_size)
        loss, _ = d(student, x, y)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in student.named_parameters()}))
    # the reference: full logits through F.cross_entropy and the KL formula, plain autograd
    student = GPT.from_pretrained(student_dir)
    logits, ce, hidden = student(x, y, return_hidden=True)
    t_feats, t_hidden = teacher(x, features_only=True, return_hidden=True)
    keep = y.reshape(-1) != -1
    kl = kl_reference(logits.reshape(-1, VOCAB)[keep], teacher.lm_head(t_feats).reshape(-1, VOCAB)[keep], 2.0)
    ref = 0.33 * ce + 0.67 * kl + 0.5 * squarehead_loss(hidden, t_hidden)
    ref.backward()
    for loss, grads in results:
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        for name, p in student.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_teacher_identical_to_student_gives_zero_kl_and_squarehead(student_dir):
    student, teacher = GPT.from_pretrained(student_dir), load_teacher(student_dir)
    d = Distiller(teacher, student.config, hardness_task=0.33, hardness_kldiv=0.67, hardness_squarehead=1.0)
    _, parts = d(student, *batch())
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["squarehead"].item() == pytest.approx(0.0, abs=1e-7)
    assert parts["ce"].item() > 0


def test_training_step_moves_only_the_student_and_teacher_stays_frozen(student_dir):
    student, teacher = GPT.from_pretrained(student_dir), perturbed(load_teacher(student_dir))
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    d = Distiller(teacher, student.config, hardness_task=0.33, hardness_kldiv=0.67, hardness_squarehead=0.5)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    teacher.train()  # a blanket .train() must not take the teacher out of eval mode
    assert not any(m.training for m in teacher.modules())
    assert not any(m is teacher for m in student.modules())

    loss, _ = d(student, *batch())
    loss.backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not torch.equal(student.state_dict()["transformer.h.0.mlp.c_fc.weight"],
                           student_before["transformer.h.0.mlp.c_fc.weight"])


def test_cross_size_teacher_distils_with_kl_only(student_dir, deep_teacher_dir):
    student, teacher = GPT.from_pretrained(student_dir), load_teacher(deep_teacher_dir)
    assert (teacher.config.n_layer, teacher.config.n_embd) != (student.config.n_layer, student.config.n_embd)
    d = Distiller(teacher, student.config, hardness_task=0.0, hardness_kldiv=1.0, chunk_size=8)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    x, y = batch()
    losses = []
    for _ in range(6):
        loss, parts = d(student, x, y)
        assert set(parts) == {"ce", "kl"}  # CE is still reported for the log
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_squarehead_with_a_teacher_of_another_size_is_a_clear_error_at_construction(student_dir, deep_teacher_dir):
    student_cfg = GPT.from_pretrained(student_dir).config
    teacher = load_teacher(deep_teacher_dir)
    with pytest.raises(UserError, match="depth and width.*teacher 4 layers × 48, student 2 × 32"):
        Distiller(teacher, student_cfg, hardness_squarehead=0.5)


def test_teacher_is_skipped_when_only_the_task_loss_is_used(student_dir):
    student, teacher = GPT.from_pretrained(student_dir), load_teacher(student_dir)

    def must_not_run(*args, **kwargs):
        raise AssertionError("teacher forward ran with hardness_kldiv = hardness_squarehead = 0")

    teacher.forward = must_not_run
    d = Distiller(teacher, student.config, hardness_task=1.0, hardness_kldiv=0.0, hardness_squarehead=0.0)
    x, y = batch()
    loss, parts = d(student, x, y)
    assert set(parts) == {"ce"}
    assert abs(loss.item() - student(x, y)[1].item()) <= 1e-6
    assert Distiller(None, student.config, hardness_task=1.0, hardness_kldiv=0.0).teacher is None


def test_bf16_teacher_and_bf16_autocast_stay_close_to_fp32(student_dir):
    student = GPT.from_pretrained(student_dir)
    x, y = batch()
    teacher32 = perturbed(load_teacher(student_dir))
    teacher16 = copy.deepcopy(teacher32).to(torch.bfloat16)
    assert teacher16.model.transformer.wte.weight.dtype == torch.bfloat16 and not teacher16.training
    ref, _ = Distiller(teacher32, student.config)(student, x, y)
    low, _ = Distiller(teacher16, student.config)(student, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, parts = Distiller(teacher32, student.config)(student, x, y)
    assert parts["ce"].dtype == parts["kl"].dtype == torch.float32  # logits upcast before log_softmax
    for value in (low, auto):
        assert torch.isfinite(value) and abs(value.item() - ref.item()) < 0.02 * ref.item()


def test_distiller_goes_through_ddp_wrapper_with_the_same_gradients(student_dir, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    teacher = perturbed(load_teacher(student_dir))
    x, y = batch()
    grads = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for wrap in (False, True):
            student = GPT.from_pretrained(student_dir)
            d = Distiller(teacher, student.config, hardness_squarehead=0.5, chunk_size=9)
            loss, _ = d(DDP(student) if wrap else student, x, y)
            loss.backward()
            grads.append({n: p.grad for n, p in student.named_parameters()})
    finally:
        dist.destroy_process_group()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ---------------------------------------------------------------------------------------------- loading, errors
def test_load_teacher_is_frozen_in_the_requested_dtype(student_dir):
    teacher = load_teacher(student_dir, dtype="bfloat16", block_size=32)
    assert isinstance(teacher, Teacher) and not teacher.training
    assert teacher.config.block_size == 32
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="no targets"):
        teacher(*batch())


def test_a_missing_teacher_is_one_line_naming_it(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_teacher(str(tmp_path / "missing"))


@pytest.mark.parametrize("change, kwargs, message", [
    (dict(vocab_size=VOCAB + 2), {}, "vocabulary"),
    (dict(block_size=128), {}, "context 64 is shorter"),
    (dict(n_embd=64), dict(hardness_squarehead=1.0), "depth and width"),
    ({}, dict(hardness_kldiv=-0.1), "hardness_kldiv must be >= 0"),
    ({}, dict(hardness_task=0.0, hardness_kldiv=0.0), "nothing to train"),
    ({}, dict(temperature=0.0), "temperature"),
    ({}, dict(chunk_size=-1), "chunk_size"),
])
def test_bad_distillation_settings_are_user_errors(student_dir, change, kwargs, message):
    teacher = load_teacher(student_dir)
    student_cfg = GPTConfig(**{**vars(teacher.config), **change})
    with pytest.raises(UserError, match=message):
        Distiller(teacher, student_cfg, **kwargs)


def test_kl_without_a_teacher_and_unknown_teacher_dtype_are_user_errors(student_dir):
    with pytest.raises(UserError, match="no teacher"):
        Distiller(None, GPTConfig(vocab_size=VOCAB), hardness_kldiv=0.5)
    with pytest.raises(UserError, match="float32, bfloat16, float16"):
        load_teacher(student_dir, dtype="fp8")
    with pytest.raises(TypeError, match="load_teacher"):
        Distiller(GPT.from_pretrained(student_dir), GPTConfig(vocab_size=VOCAB, block_size=64))
