"""
AdamW for bf16 parameters that does not lose small updates (for configs/phi35.py).

Full fine-tuning at lr 2e-5 moves a weight of size ~1e-2 by ~1e-7 per step, far below bf16's
resolution there (bf16 keeps 8 significant bits: spacing ~6e-5 at 0.01): round-to-nearest writes the old value back and training
silently stalls. Keeping fp32 master weights costs 4 more bytes per parameter (16 instead of 12),
which is what does not fit for Phi-3.5-MoE on 8 x 80 GB (design/PERF.md). Instead: Adam's m and v
in fp32, the update computed in fp32, and the new weight written to bf16 with stochastic rounding,
which is unbiased -- small updates survive in expectation.
"""
import torch


def stochastic_round_(param_bf16, value_fp32):
    """Write value into a bf16 tensor, rounding up or down at random with the probability that
    makes the result unbiased (E[result] = value): updates far below bf16's spacing are kept in
    expectation instead of lost. value's low 16 bits + uniform noise carry into the kept bits
    with probability (low bits) / 2^16; then the low bits are cleared (truncation is exact)."""
    bits = value_fp32.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    param_bf16.copy_(((bits + noise) & -65536).view(torch.float32))  # exact: low 16 bits are 0


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 parameters: m and v in fp32, the update in fp32, the result stochastically
    rounded to bf16. 12 bytes/param with bf16 grads (vs 16 for fp32 master weights)."""

    def __init__(self, params, lr, betas, weight_decay, eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor shard
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(local, dtype=torch.float32)
                    state["v"] = torch.zeros_like(local, dtype=torch.float32)
                state["step"] += 1
                g = grad.float()
                state["m"].lerp_(g, 1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["m"] / (1 - b1 ** state["step"])
                v_hat = state["v"] / (1 - b2 ** state["step"])
                new = local.float() * (1 - group["lr"] * group["weight_decay"])
                new -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])
                stochastic_round_(local, new)
