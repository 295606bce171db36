import pytest
import torch
import torch.nn.functional as F

from palm.model.loss import IGNORE_INDEX, fused_lm_loss, lm_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_and_its_gradient_are_cross_entropy_and_logsumexp_squared(dtype):
    # The reference written the textbook way; lm_loss takes both terms from one log-softmax in fp32.
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 40, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (2, 40))
    targets[:, :5] = IGNORE_INDEX
    ce, z = lm_loss(logits, targets)
    (ce + 0.3 * z).backward()
    got = logits.grad
    logits.grad = None
    flat, t = logits.float().flatten(0, 1), targets.flatten()
    ref_ce = F.cross_entropy(flat, t, ignore_index=IGNORE_INDEX)
    ref_z = flat.logsumexp(-1)[t != IGNORE_INDEX].square().mean()
    (ref_ce + 0.3 * ref_z).backward()
    assert ce.dtype == z.dtype == torch.float32
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(got, logits.grad)
    assert not got[:, :5].any()  # ignored positions get no gradient
    # num_items (Transformers' num_items_in_batch) divides the sums instead of the local count
    ce_n, z_n = lm_loss(logits.detach(), targets, num_items=100)
    torch.testing.assert_close(ce_n, ref_ce * 70 / 100)
    torch.testing.assert_close(z_n, ref_z * 70 / 100)


# d = 16: the head's gradient summed over the chunks in fp32; d = 640: the logits' gradient for all 600
# tokens (600 x 4 bytes <= 640 x 4) kept whole and the head's gradient taken in one matmul
@pytest.mark.parametrize("d", [16, 640])
@pytest.mark.parametrize("row_elements", [None, 7 * 50])
@pytest.mark.parametrize("z_coef", [0.0, 1e-4, 0.5])
def test_fused_loss_matches_logits_loss_in_value_and_gradient(z_coef, row_elements, d):
    torch.manual_seed(0)
    n, vocab = 600, 50  # chunks of 256 rows: three chunks, the last one short
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[::7] = -100
    ce, z = lm_loss(h @ w.t(), targets)
    (2 * (ce + z_coef * z)).backward()
    ref = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, ce2, z2 = fused_lm_loss(h, w, targets, z_coef, chunk_bytes=1, row_elements=row_elements)
    (2 * loss).backward()
    torch.testing.assert_close(ce2, ce)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(loss, ce + z_coef * z)
    torch.testing.assert_close(h.grad, ref[0])
    torch.testing.assert_close(w.grad, ref[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_is_the_same_to_the_bit_whatever_the_rows_per_elementwise_pass(dtype):
    # The elementwise work runs on a few rows at a time to stay in cache; rows are independent, so
    # how many go into a pass (one, seven with a short last pass, or a whole chunk) changes no bit.
    torch.manual_seed(0)
    n, d, vocab = 600, 16, 50
    targets = torch.randint(0, vocab, (n,))
    targets[::7] = -100
    results = []
    for row_elements in (vocab, 7 * vocab, 256 * vocab):
        h = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        w = torch.randn(vocab, d, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
        loss, ce, z = fused_lm_loss(h, w, targets, 1e-4, chunk_bytes=1, row_elements=row_elements)
        loss.backward()
        results.append((loss.detach(), ce, z, h.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("d", [16, 320])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_in_bf16_has_the_logits_loss_gradient_within_bf16_rounding(d, autocast):
    """bf16 compute copies (bf16 tensors) and autocast (fp32 tensors, bf16 matmuls), with the head's gradient
    summed in fp32 (d = 16) or taken in one matmul over all 600 tokens (d = 320: 600 x 2 bytes <= 320 x 4)."""
    torch.manual_seed(0)
    n, vocab = 600, 50
    h0, w0 = torch.randn(n, d) / d**0.25, torch.randn(vocab, d) / d**0.25
    targets = torch.randint(0, vocab, (n,))
    targets[::7] = -100
    h, w = (x.clone().requires_grad_() for x in (h0, w0))
    ce, z = lm_loss(h @ w.t(), targets)
    (ce + 1e-4 * z).backward()
    dtype = torch.float32 if autocast else torch.bfloat16
    hb, wb = (x.to(dtype).requires_grad_() for x in (h0, w0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _, _ = fused_lm_loss(hb, wb, targets, 1e-4, chunk_bytes=1)
    loss.backward()
    torch.testing.assert_close(loss.float(), ce + 1e-4 * z, rtol=2e-2, atol=2e-2)
    for got, want in ((hb.grad, h.grad), (wb.grad, w.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=2e-2 * want.abs().max().item())
