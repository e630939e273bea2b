"""The training loss on the model's head, for any model family: w_ce·CE (+ w_kl·τ²·KL to a teacher), chunked.

    loss, ce, kl = lm_head_loss(x, weight, targets)                                   # CE (what GPT.forward uses)
    loss, ce, kl = lm_head_loss(x, weight, targets, teacher_x=tx, teacher_weight=tw,  # distill.py's objective
                                temperature=2.0, w_ce=0.33, w_kl=0.67)

x: final features (N, C) (after the last norm, and after OPT-350m's project_out); weight (V, C) and an optional
bias (V,) of the head; targets (N,), -1 = ignored. The full-vocabulary logits are the memory hog ((B·T) × V
fp32 values per model, plus their softmaxes), so the head is applied to chunks of tokens whose gradients are
formed in the forward: per chunk, student logits z; d CE / dz = softmax(z) − onehot; d (τ² KL) / dz =
τ (softmax(z/τ) − p_t). The two logit gradients are summed and multiplied back into dx, d weight and d bias at
once, and the chunk's logits are freed: a cache-sized chunk makes this several times faster than autograd
through log_softmax on a CPU, and on a GPU no (N, V) tensor outlives its chunk. Only `loss` is differentiable;
ce and kl come back detached, for the log (kl is None without a teacher).
"""
import torch


def default_chunk_size(device, width: int, with_kl: bool = False) -> int:
    """Tokens per chunk when the caller does not say.

    On a CPU a narrow model's chunk of 64 × vocab logits stays in cache, which makes the fused loss 1.5-1.9x
    faster than full logits; a wide model's time goes to the GEMMs, which a K = 64 update of the (vocab, C)
    gradient runs badly, so chunks grow with the width. Measured (one thread, fwd + bwd): CE alone is fastest
    at 128-256 tokens for C = 384 and at 512-1024 for C = 768; CE + KL, which holds four chunk-sized arrays,
    at 64-256 for C = 384 and 256 for C = 768. On GPUs 2048.
    """
    if torch.device(device).type != "cpu":
        return 2048
    if width <= 128:
        return 64
    return 256 if with_kl or width < 768 else 1024


def lm_head_loss(x, weight, targets, bias=None, teacher_x=None, teacher_weight=None, teacher_bias=None,
                 temperature=1.0, w_ce=1.0, w_kl=0.0, chunk_size=0):
    """(w_ce·CE + w_kl·τ²·KL, CE, KL): mean over the tokens whose target is not -1; see the module docstring.

    chunk_size: tokens per chunk, 0 = default_chunk_size; only one chunk's logits exist at a time.
    """
    want_kl = teacher_x is not None
    if not chunk_size:
        chunk_size = default_chunk_size(x.device, x.shape[-1], with_kl=want_kl)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    loss, ce, kl = _FusedLMHeadLoss.apply(x, weight, bias, targets, teacher_x, teacher_weight, teacher_bias,
                                          float(temperature), int(chunk_size), float(w_ce), float(w_kl), need_grad)
    return loss, ce, (kl if want_kl else None)


def cross_entropy(x, weight, targets, bias=None, chunk_size=0):
    """Mean next-token cross-entropy of the logits x Wᵀ (+ b), differentiable, without the full logits."""
    return lm_head_loss(x, weight, targets, bias=bias, chunk_size=chunk_size)[0]


def _accumulate_gemm(out, a, b):
    """out += a @ b. Under autocast the GEMM runs in the autocast dtype (bf16 on GPUs) and its result is added to
    the fp32 `out`, as autograd would accumulate a bf16 weight gradient; an in-place addmm_ would bypass autocast
    and run this vocab × width × tokens GEMM in fp32. On CUDA the bf16 GEMM writes fp32 directly (out_dtype)."""
    device = a.device.type
    if not torch.is_autocast_enabled(device):
        out.addmm_(a, b.to(out.dtype))
        return
    low = torch.get_autocast_dtype(device)
    a, b = a.to(low), b.to(low)
    if device == "cuda":
        try:
            out.add_(torch.mm(a, b, out_dtype=out.dtype))
            return
        except (RuntimeError, TypeError):  # a torch without bf16 -> fp32 GEMMs
            pass
    out.add_(torch.mm(a, b))


def _logits(x, weight, bias):
    z = x @ weight.t().to(x.dtype)
    return z if bias is None else z + bias.to(z.dtype)


class _FusedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, teacher_x, teacher_weight, teacher_bias, temperature, chunk_size,
                w_ce, w_kl, need_grad):
        f = torch.promote_types(x.dtype, torch.float32)
        want_kl = teacher_x is not None
        valid = targets != -1
        n = valid.sum().clamp(min=1).to(f)
        ce, kl = torch.zeros((), dtype=f, device=x.device), torch.zeros((), dtype=f, device=x.device)
        dx = dw = db = None
        if need_grad:
            dx, dw = torch.empty_like(x), torch.zeros_like(weight, dtype=f)
            db = None if bias is None else torch.zeros_like(bias, dtype=f)
        for i in range(0, x.shape[0], chunk_size):
            xs, t, ok = x[i:i + chunk_size], targets[i:i + chunk_size].clamp(min=0), valid[i:i + chunk_size]
            okf = ok.to(f).unsqueeze(1)
            rows = torch.arange(len(t), device=x.device)
            z = _logits(xs, weight, bias).to(f)
            lse = torch.logsumexp(z, dim=-1)
            ce += ((lse - z[rows, t]) * okf.squeeze(1)).sum()
            g_kl = None
            if want_kl:
                zt = _logits(teacher_x[i:i + chunk_size], teacher_weight, teacher_bias).to(f).div_(temperature)
                log_t = zt.sub_(torch.logsumexp(zt, dim=-1, keepdim=True))
                log_s = z / temperature
                log_s = log_s.sub_(torch.logsumexp(log_s, dim=-1, keepdim=True))
                p_t = log_t.exp()
                kl += ((log_t - log_s).mul_(p_t).sum(-1) * okf.squeeze(1)).sum()
                if need_grad and w_kl:
                    g_kl = log_s.exp_().sub_(p_t).mul_(okf * (w_kl * temperature / n))  # d(w τ²·KL/n)/dz
            if need_grad:
                g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax(z), in place of the logits
                g[rows, t] -= 1.0
                g.mul_(okf * (w_ce / n))
                if g_kl is not None:
                    g += g_kl
                dx[i:i + len(xs)] = g.to(xs.dtype) @ weight.to(xs.dtype)
                _accumulate_gemm(dw, g.t(), xs)
                if db is not None:
                    db += g.sum(0)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(dx, dw, db)
        ce, kl = ce / n, kl * temperature ** 2 / n
        loss = w_ce * ce + (w_kl * kl if want_kl else 0.0)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        dx, dw, db = ctx.saved_tensors
        gx = gw = gb = None
        if grad_loss is not None and dx is not None:
            gx, gw = dx * grad_loss, (dw * grad_loss).to(ctx.weight_dtype)
            gb = None if db is None else (db * grad_loss).to(ctx.bias_dtype)
        return gx, gw, gb, None, None, None, None, None, None, None, None, None
