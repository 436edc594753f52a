"""
The language-model loss without the (N, V) logits: lm_head + cross-entropy a chunk of tokens at a
time, with the gradient computed in the forward (MoEConfig.loss_chunk_size > 0; model.py calls it).
Measured (bench.py, one H100): for Qwen3's 152k vocabulary the fp32 logits of 8k tokens are 5 GB;
chunked, the peak is one chunk's, and nothing is recomputed.

    chunked_cross_entropy(h (N, H), weight (V, H), bias (V,) or None, targets (N,), chunk) -> fp32 scalar
"""
import functools

import torch
import torch.nn.functional as F


def _ce_chunk(logits, targets, inv_n):
    """
    Cross-entropy of a chunk of rows and its gradient. logits (n, V) model dtype; targets (n,),
    -100 = ignored; inv_n = 1 / (number of targets in the whole batch). Returns the chunk's summed
    loss (fp32 scalar) and d(mean loss)/d(logits) (n, V) in the logits' dtype. The softmax runs in
    fp32, as F.cross_entropy(logits.float()) does.
    """
    logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits32, dim=-1, keepdim=True)  # (n, 1)
    valid = targets != -100
    target = torch.where(valid, targets, 0)[:, None]  # (n, 1)
    loss_sum = torch.where(valid, (lse - logits32.gather(1, target)).squeeze(1), 0.0).sum()
    is_target = torch.arange(logits.shape[1], device=logits.device) == target  # (n, V)
    grad = (torch.exp(logits32 - lse) - is_target.to(lse.dtype)) * (valid[:, None] * inv_n)
    return loss_sum, grad.to(logits.dtype)


@functools.cache
def _compiled_ce_chunk():
    # On a GPU, inductor fuses this into one kernel over the bf16 logits (measured on an H100:
    # 1.75 ms per 4096 x 151936 chunk, ~3 reads + 1 write at memory speed); eager _ce_chunk
    # makes ~8 passes over (n, V) fp32 temporaries.
    return torch.compile(_ce_chunk, dynamic=False)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """
    mean CE(h W^T + b, targets), `chunk` rows at a time. The loss is a scalar, so the gradients
    are known in the forward up to the incoming scalar: each chunk's logits are used for the
    loss and its gradient, then freed. The (N, V) logits never exist at once (5 GB in fp32 for
    Qwen3's 152k vocabulary and 8k tokens), and nothing is recomputed. Numerics as the plain
    path (bf16 logits, fp32 softmax, bf16 logit gradient), except that with several chunks the
    weight gradient is accumulated chunk by chunk in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        # h (N, H), weight (V, H), bias (V,) or None, targets (N,)
        inv_n = 1.0 / (targets != -100).sum().to(torch.promote_types(h.dtype, torch.float32))
        ce = _compiled_ce_chunk() if h.is_cuda else _ce_chunk
        need_grad = any(ctx.needs_input_grad[:3])
        loss = torch.zeros((), dtype=inv_n.dtype, device=h.device)
        grad_h = grad_w = grad_b = None
        if need_grad:
            grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
            if bias is not None:
                grad_b = torch.zeros(weight.shape[0], dtype=inv_n.dtype, device=h.device)
        for start in range(0, h.shape[0], chunk):
            h_c = h[start:start + chunk]  # (n, H)
            loss_c, grad_c = ce(F.linear(h_c, weight, bias), targets[start:start + chunk], inv_n)
            loss += loss_c
            if need_grad:
                torch.mm(grad_c, weight, out=grad_h[start:start + chunk])  # (n, H)
                grad_w.addmm_(grad_c.t(), h_c)  # (V, H)
                if bias is not None:
                    grad_b += grad_c.sum(dim=0, dtype=grad_b.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss * inv_n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_b = (grad_b * grad_loss).to(grad_w.dtype) if grad_b is not None else None
        return grad_h * grad_loss, grad_w * grad_loss, grad_b, None, None


def chunked_cross_entropy(h, weight, bias, targets, chunk):
    """mean over targets != -100 of CE(h @ weight.T + bias, targets), never materialising all
    logits. h (N, H), weight (V, H), bias (V,) or None, targets (N,) -> fp32 scalar."""
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, chunk)
