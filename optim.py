"""
The optimizer side of training: the learning-rate schedule, the AdamW setup, and AdamW for bf16
parameters that does not lose small updates (for configs/phi35.py).

    lr_at(step, total, peak, warmup_frac, min_lr_frac) -> float
    make_optimizer(model, kind, lr, betas, weight_decay, fused=False)   kind: "fp32" or "bf16_sr"

AdamWBF16:
Full fine-tuning at lr 2e-5 moves a weight of size ~1e-2 by ~1e-7 per step, far below bf16's
resolution there (bf16 keeps 8 significant bits: spacing ~6e-5 at 0.01): round-to-nearest writes the old value back and training
silently stalls. Keeping fp32 master weights costs 4 more bytes per parameter (16 instead of 12),
which is what does not fit for Phi-3.5-MoE on 8 x 80 GB (docs/performance.md). Instead: Adam's m and v
in fp32, the update computed in fp32, and the new weight written to bf16 with stochastic rounding,
which is unbiased -- small updates survive in expectation.
"""
import math

import torch


def lr_at(step, total, peak, warmup_frac, min_lr_frac):
    """Linear warmup over warmup_frac of the total steps (at least one step), then cosine decay
    from peak to min_lr_frac * peak at the last step."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, kind, lr, betas, weight_decay, fused=False):
    """AdamW with weight decay on matrices only (norms and biases: none). kind "fp32": torch's
    AdamW on fp32 parameters; "bf16_sr": AdamWBF16 on bf16 parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if kind == "bf16_sr":
        return AdamWBF16(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind != "fp32":
        raise ValueError(f"optimizer kind {kind!r}: expected 'fp32' or 'bf16_sr'")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


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
    rounded to bf16. 12 bytes/param with bf16 grads (vs 16 for fp32 master weights).
    Under FSDP2 the states are DTensors sharded like their parameter, so a distributed checkpoint
    saves every rank's shard (plain tensors would be taken as replicated: rank 0's only)."""

    def __init__(self, params, lr, betas, weight_decay, eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))

    def load_state_dict(self, state_dict):
        """As torch's, except that m and v stay fp32: torch casts every floating-point state to its
        parameter's dtype, which would round Adam's moments to bf16 on every resume."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key in ("m", "v"):
                if i in saved and key in saved[i]:
                    self.state[p][key] = saved[i][key].to(device=self.state[p][key].device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        """closure: as torch.optim.Optimizer.step (torch.distributed.checkpoint calls step(closure=None)
        with lr 0 to create the states before loading them)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor shard
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["m"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                m = state["m"].to_local() if hasattr(state["m"], "to_local") else state["m"]
                v = state["v"].to_local() if hasattr(state["v"], "to_local") else state["v"]
                state["step"] += 1
                t = float(state["step"])
                g = grad.float()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m / (1 - b1 ** t)
                v_hat = v / (1 - b2 ** t)
                new = local.float() * (1 - group["lr"] * group["weight_decay"])
                new -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])
                stochastic_round_(local, new)
        return loss
