"""The GPU path, on a CUDA GPU only (scripts/gpu_check.sh runs these with `pytest -m cuda`; skipped elsewhere)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import GemmInputDtypes
from loss import lm_head_loss
from model import GPT, GPTConfig
from sparsity import nm_mask, sparse_layers, sparsify

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fused_loss_runs_its_gemms_in_bf16_with_fp32_gradients_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 256, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(5000, 256, device="cuda", generator=g, requires_grad=True)
    y = torch.randint(0, 5000, (512,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16), GemmInputDtypes() as mode:
        loss, _, _ = lm_head_loss(x, w, y, teacher_x=x.detach(), teacher_weight=w.detach(), temperature=2.0,
                                  w_ce=0.33, w_kl=0.67, chunk_size=128)
    assert mode.seen and all(seen[1:] == (torch.bfloat16, torch.bfloat16) for seen in mode.seen), mode.seen
    loss.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_bf16_autocast_training_step_tracks_the_fp32_one():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=1000, n_layer=2, n_head=4, n_embd=128)
    ref = GPT(cfg).cuda()
    sparsify(ref, slorb_k=16, trainable_projection=True)
    low = GPT(cfg).cuda()
    sparsify(low, slorb_k=16, trainable_projection=True)
    low.load_state_dict(ref.state_dict())
    x = torch.randint(0, 1000, (4, 128), device="cuda")
    _, l32 = ref(x, targets=x, return_logits=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, l16 = low(x, targets=x, return_logits=False)
    l32.backward()
    l16.backward()
    assert abs(l16.item() - l32.item()) < 0.01 * l32.item()
    for (_, a), (_, b) in zip(sparse_layers(ref), sparse_layers(low)):
        cos = F.cosine_similarity(a.weight.grad.flatten(), b.weight.grad.flatten(), dim=0)
        assert b.weight.grad.dtype == torch.float32 and cos > 0.99


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_2_4_kernel_gives_the_masked_dense_product(dtype):
    from torch.sparse import to_sparse_semi_structured

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability 8.0 or newer")
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(3072, 768, device="cuda", dtype=dtype, generator=g)
    w = w * nm_mask(w.float().abs(), 2, 4)  # our mask, the layout the kernels accelerate
    x = torch.randn(1024, 768, device="cuda", dtype=dtype, generator=g)
    ref = F.linear(x, w)
    got = F.linear(x, to_sparse_semi_structured(w))
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
