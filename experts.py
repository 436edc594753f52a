"""
The two expert dispatch paths of the MoE layer (model.MoE), the same function computed two ways:

    experts_loop     one matmul per expert, ascending expert order: the reference, bit-exact in bf16
                     with transformers' eager experts (tests/test_hf_parity.py)
    experts_grouped  sort the (token, slot) pairs by expert, one torch grouped_mm per projection,
                     gathers in both directions, no host sync

Both: x (N, H), expert_ids (N, K), weights (N, K), gate_up (E, 2I, H), down (E, H, I) -> (N, H).
Options (GPT-OSS, families/gpt_oss.py): per-expert biases gate_up_bias (E, 2I) and down_bias (E, H), and
`act`, the function (n, 2I) -> (n, I) between the projections (default: swiglu, rows [gate; up];
clamped_swiglu: GPT-OSS's, rows interleaved). Without them both paths run exactly as before.
MoEConfig.expert_impl="auto" takes grouped wherever torch has a grouped_mm kernel for the device
(CUDA; CPU from torch 2.11). Measured on CPU (bench.py's toy shapes, fp32, 1 thread, process CPU
time, interleaved pairs, torch 2.13): a training step with grouped runs 1.12-1.26x the loop's
tokens/s (Qwen-style E=16 K=4 and Phi-style E=8 K=2, five runs); the loop's one matmul per expert
and its host syncs were what put ours at 0.81x / 0.86x transformers' grouped_mm.
"""
import torch
import torch.nn.functional as F


class _GatherRows(torch.autograd.Function):
    """
    out = x[index], where every row of x appears exactly K times in `index` (K = 1: a
    permutation) and back_index[j] is the row of `out` holding the (j % K)-th copy of row j // K.
    The backward gathers through back_index and sums each row's K copies, instead of autograd's
    scatter-add (index_add_, atomics on CUDA): deterministic, and its output is contiguous, which
    grouped_mm's backward needs (it rejects e.g. the stride-0 gradient of `out.sum()`).
    """

    @staticmethod
    def forward(ctx, x, index, back_index, K):
        ctx.save_for_backward(back_index)
        ctx.K = K
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back_index,) = ctx.saved_tensors
        grad = grad.index_select(0, back_index)  # (rows of x * K, H), copies of a row adjacent
        if ctx.K > 1:
            grad = grad.view(-1, ctx.K, grad.shape[-1]).sum(dim=1)
        return grad, None, None, None


def find_grouped_mm():
    """torch's grouped matmul: the public F.grouped_mm, else the private op torch._grouped_mm that builds
    without the public name carry (same arguments: mat_a, mat_b, offs=); None if neither exists."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


GROUPED_MM = find_grouped_mm()
# torch's grouped_mm has a CPU kernel from 2.9; up to 2.10 it needs 16-byte aligned operands,
# which memory-mapped checkpoint tensors need not be
GROUPED_ON_CPU = GROUPED_MM is not None and tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 11)


def swiglu(h):
    """h (n, 2I), columns [gate; up] -> silu(gate) * up (n, I): Qwen3's and Phi-3.5's experts."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def clamped_swiglu(h, alpha, limit):
    """
    GPT-OSS's expert activation. h (n, 2I) with gate and up INTERLEAVED (gate_j = column 2j, up_j =
    column 2j + 1, the layout its checkpoints store) -> (n, I):
        gate <- min(gate, limit);  up <- clamp(up, -limit, limit)
        out = (up + 1) * gate * sigmoid(alpha * gate)
    (transformers' GptOssExperts._apply_gate, op for op.)
    """
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def experts_loop(x, expert_ids, weights, gate_up, down, gate_up_bias=None, down_bias=None, act=None):
    """
    Reference dispatch: one matmul per expert, results accumulated in ascending expert order.
    x (N, H), expert_ids (N, K), weights (N, K), gate_up (E, 2I, H), down (E, H, I) -> (N, H);
    optional gate_up_bias (E, 2I), down_bias (E, H), act (n, 2I) -> (n, I) (module docstring).
    """
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        # tokens (and which of their K slots) routed to expert e; a host sync, fine on CPU.
        # An expert with no tokens still runs on an empty batch: its weights get a zero gradient.
        token_idx, slot = torch.where(expert_ids == e)
        if act is None and gate_up_bias is None and down_bias is None:  # Qwen3 / Phi-3.5, as always
            gate, up = F.linear(x[token_idx], gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, down[e])  # (n_e, H)
        else:
            h = F.linear(x[token_idx], gate_up[e])  # (n_e, 2I); bias added after, as transformers does
            if gate_up_bias is not None:
                h = h + gate_up_bias[e]
            y = F.linear((act or swiglu)(h), down[e])  # (n_e, H)
            if down_bias is not None:
                y = y + down_bias[e]
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])  # eq. 5: y = sum_k w_k E_k(h)
    return out


def experts_grouped(x, expert_ids, weights, gate_up, down, gate_up_bias=None, down_bias=None, act=None):
    """
    Grouped-GEMM dispatch, no host syncs: sort the N*K (token, slot) pairs by expert, run each
    projection as one grouped matmul over contiguous per-expert row blocks, un-sort, and combine
    each token's K outputs with its K weights in one batched matmul (fp32 accumulation). Same
    function as experts_loop (sum order differs -> bf16 ulps).
    """
    N, H = x.shape
    E, K = gate_up.shape[0], expert_ids.shape[1]
    sorted_ids, order = torch.sort(expert_ids.reshape(-1), stable=True)  # (N*K,) slots by expert
    # end row of each expert's block; searchsorted, unlike bincount, has a static output size
    # and never syncs with the host
    offsets = torch.searchsorted(sorted_ids, torch.arange(E, device=x.device), right=True).to(torch.int32)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=x.device))
    xs = _GatherRows.apply(x, order // K, inverse, K)  # (N*K, H), row r = token order[r] // K
    h = GROUPED_MM(xs, gate_up.transpose(1, 2), offs=offsets)  # (N*K, 2I)
    if act is None and gate_up_bias is None and down_bias is None:  # Qwen3 / Phi-3.5, as always
        gate, up = h.chunk(2, dim=-1)
        y = GROUPED_MM(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)  # (N*K, H)
    else:  # row r of the sorted pairs belongs to expert sorted_ids[r]: its bias row is gathered
        if gate_up_bias is not None:
            h = h + gate_up_bias.index_select(0, sorted_ids)
        y = GROUPED_MM((act or swiglu)(h), down.transpose(1, 2), offs=offsets)  # (N*K, H)
        if down_bias is not None:
            y = y + down_bias.index_select(0, sorted_ids)
    y = _GatherRows.apply(y, inverse, order, 1).view(N, K, H)  # back to (token, slot) order
    if torch.compiler.is_compiling() or not y.is_cuda:
        # inductor fuses the gather above, this product and the sum into one pass over y (and
        # likewise the backward); it keeps a bmm as three cuBLAS calls at ~3x memory time (H100).
        # On CPU, bmm of N (1, K) x (K, H) products is ~5% slower per MoE layer (fwd + bwd).
        return (y * weights[:, :, None]).sum(dim=1)
    return torch.bmm(weights.view(N, 1, K), y).view(N, H)  # sum_k w_k y_k, one pass in eager CUDA
