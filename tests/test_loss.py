"""loss.py: the chunked head loss (CE, + KL to a teacher) against plain autograd over the full logits."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import GemmInputDtypes
from loss import cross_entropy, default_chunk_size, lm_head_loss


def reference(x, w, b, y, tx=None, tw=None, tb=None, tau=1.0, w_ce=1.0, w_kl=0.0):
    """The same objective written out: full logits, F.cross_entropy, and KL(teacher ‖ student) by its formula."""
    logits = F.linear(x, w, b).float()
    keep = y != -1
    ce = F.cross_entropy(logits, y, ignore_index=-1) if keep.any() else logits.sum() * 0
    if tx is None:
        return w_ce * ce, ce, None
    p_t = F.softmax(F.linear(tx, tw, tb).float() / tau, -1)
    log_s = F.log_softmax(logits / tau, -1)
    per_token = (p_t * (p_t.clamp_min(1e-30).log() - log_s)).sum(-1)
    kl = (per_token * keep).sum() / keep.sum().clamp(min=1) * tau ** 2
    return w_ce * ce + w_kl * kl, ce, kl


@pytest.mark.parametrize("chunk", [7, 64, 0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cross_entropy_matches_full_logits_values_and_gradients(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(300, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    t = torch.randint(0, 300, (50,), generator=g)
    t[[3, 17]] = -1  # ignored positions
    ref = F.cross_entropy(F.linear(x, w, b), t, ignore_index=-1)
    inputs = (x, w) + ((b,) if with_bias else ())
    ref_grads = torch.autograd.grad(3.0 * ref, inputs)
    loss = cross_entropy(x, w, t, bias=b, chunk_size=chunk)
    grads = torch.autograd.grad(3.0 * loss, inputs)
    assert abs(loss.item() - ref.item()) < 1e-12
    for a, r in zip(grads, ref_grads):
        assert (a - r).abs().max() < 1e-12
    with torch.no_grad():
        assert abs(cross_entropy(x, w, t, bias=b, chunk_size=chunk).item() - ref.item()) < 1e-12


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), chunk=st.integers(0, 45), seed=st.integers(0, 2 ** 16),
       w_ce=st.sampled_from([0.0, 0.33, 1.0]), w_kl=st.sampled_from([0.0, 0.67, 2.0]), teacher=st.booleans(),
       bias=st.booleans())
def test_weighted_loss_has_the_values_and_gradient_of_the_reference_terms(n, chunk, seed, w_ce, w_kl, teacher, bias):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, 6, generator=g), torch.randn(29, 6, generator=g)
    b = torch.randn(29, generator=g) if bias else None
    tx, tw = (torch.randn(n, 5, generator=g), torch.randn(29, 5, generator=g)) if teacher else (None, None)
    tb = torch.randn(29, generator=g) if (teacher and bias) else None
    y = torch.randint(-1, 29, (n,), generator=g)

    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    loss, ce, kl = lm_head_loss(leaves[0], leaves[1], y, bias=leaves[2] if bias else None, teacher_x=tx,
                                teacher_weight=tw, teacher_bias=tb, temperature=1.5, w_ce=w_ce, w_kl=w_kl,
                                chunk_size=chunk)
    loss.backward()
    assert not ce.requires_grad and (kl is None) == (not teacher)

    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ref, ref_ce, ref_kl = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, y, tx, tw, tb,
                                    tau=1.5, w_ce=w_ce, w_kl=w_kl)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-6)
    if teacher:
        torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-5, atol=1e-6)
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_kl_is_forward_kl_teacher_to_student_not_reverse():
    s, t = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    eye = torch.eye(3)  # features x identity head = the logits themselves
    forward = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    reverse = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="sum")
    assert abs(forward - reverse) > 0.1  # the test can tell the two apart
    _, _, kl = lm_head_loss(s, eye, torch.tensor([0]), teacher_x=t, teacher_weight=eye, temperature=1.0,
                            w_kl=1.0)
    assert kl.item() == pytest.approx(forward.item(), abs=1e-6)


def test_temperature_scales_by_tau_squared_the_kl_of_softened_logits():
    g = torch.Generator().manual_seed(1)
    s, t, tau = 3 * torch.randn(5, 37, generator=g), 3 * torch.randn(5, 37, generator=g), 2.0
    eye = torch.eye(37)
    _, _, kl = lm_head_loss(s, eye, torch.zeros(5, dtype=torch.long), teacher_x=t, teacher_weight=eye,
                            temperature=tau, w_kl=1.0, chunk_size=2)
    by_torch = F.kl_div(F.log_softmax(s / tau, -1), F.softmax(t / tau, -1), reduction="batchmean") * tau ** 2
    assert abs(kl.item() - by_torch.item()) <= 1e-5


def test_bf16_autocast_stays_close_and_reports_fp32():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 32, generator=g), torch.randn(500, 32, generator=g) * 0.1
    tx, tw = torch.randn(64, 32, generator=g), torch.randn(500, 32, generator=g) * 0.1
    y = torch.randint(0, 500, (64,), generator=g)
    ref = lm_head_loss(x, w, y, teacher_x=tx, teacher_weight=tw, temperature=2.0, w_ce=0.33, w_kl=0.67)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lm_head_loss(x, w, y, teacher_x=tx.bfloat16(), teacher_weight=tw.bfloat16(), temperature=2.0,
                           w_ce=0.33, w_kl=0.67)
    assert low[1].dtype == low[2].dtype == torch.float32  # logits upcast before the softmax
    for a, b in zip(low, ref):
        assert abs(a.item() - b.item()) < 0.02 * abs(b.item())


def test_default_chunks_grow_with_width_on_cpu_and_are_large_on_gpus():
    assert default_chunk_size("cpu", 64) == 64
    assert default_chunk_size("cpu", 384) == 256 and default_chunk_size("cpu", 768) == 1024
    assert default_chunk_size("cpu", 768, with_kl=True) == 256
    assert default_chunk_size("cuda", 64) == 2048


def test_every_gemm_of_the_fused_loss_runs_in_bf16_under_autocast():
    """Under bf16 autocast the logits, dx and d weight GEMMs (student and teacher) all take bf16 operands;
    the gradients still arrive in fp32 master precision."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(200, 16, generator=g, requires_grad=True)
    tx, tw = torch.randn(40, 12, generator=g), torch.randn(200, 12, generator=g)
    y = torch.randint(0, 200, (40,), generator=g)
    mode = GemmInputDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), mode:
        loss, _, _ = lm_head_loss(x, w, y, teacher_x=tx, teacher_weight=tw, temperature=2.0, w_ce=0.33, w_kl=0.67,
                                  chunk_size=16)
    # per chunk of 16 tokens: student logits, teacher logits, dx, d weight
    assert len(mode.seen) == 4 * 3
    assert all(seen[1:] == (torch.bfloat16, torch.bfloat16) for seen in mode.seen), mode.seen
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    ref = lm_head_loss(x.detach().requires_grad_(), w.detach().requires_grad_(), y, teacher_x=tx, teacher_weight=tw,
                       temperature=2.0, w_ce=0.33, w_kl=0.67)[0]
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()


def test_the_gemm_recorder_reads_the_cuda_only_mm_with_an_out_dtype():
    """The CUDA loss multiplies bf16 matrices into fp32 with torch.mm(a, b, out_dtype=...), which reaches a dispatch
    mode as aten.mm.dtype(a, b, out_dtype): its last argument is a dtype. That op has no CPU kernel, but meta tensors
    take the same path, so the recorder tests/test_cuda.py uses is checked here against every GEMM signature."""
    a = torch.empty(8, 4, dtype=torch.bfloat16, device="meta")
    b = torch.empty(4, 6, dtype=torch.bfloat16, device="meta")
    c = torch.empty(8, 6, dtype=torch.bfloat16, device="meta")
    with GemmInputDtypes() as mode:
        out = torch.mm(a, b, out_dtype=torch.float32)
        torch.mm(a, b)
        torch.addmm(c, a, b)
        torch.bmm(a[None], b[None])
    assert out.dtype == torch.float32 and out.shape == (8, 6)
    bf16 = (torch.bfloat16, torch.bfloat16)
    assert mode.seen == [("aten.mm.dtype", *bf16), ("aten.mm.default", *bf16), ("aten.addmm.default", *bf16),
                         ("aten.bmm.default", *bf16)]
