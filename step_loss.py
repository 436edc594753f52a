"""
The loss of one training step, eq. 12, assembled in one place (the training loop, train.py and the
experiments all call step_loss):

    L = L_CE + λ_LB · L_LB (+ λ_z · L_z, the router z-loss of ST-MoE) + Σ_m λ_m · L_m

(L_CE weighted by the method's ce_weight, 1 for all but ShifCon: 0.5 · L_CE in its authors' code)

where each L_m is a term an alignment method adds (methods/: SARA adds λ_JS · L_JS, eq. 9).

Under gradient accumulation a step is n_micro micro-batches on this rank. L_CE, L_LB and L_z are means
over one micro-batch, and the step's loss is their mean over the micro-batches. A method's term may
instead be this micro-batch's share of a mean over the WHOLE step (Term.step_share=True; SARA's L_JS
is the mean over every anchored sample of every micro-batch and rank, so a micro-batch without
anchors does not dilute λ_JS): it is summed over the micro-batches, not averaged.

A term with weight 0 is computed (and logged) but never enters the total: the gradient, and so
the run, is bit for bit that of the loss without it.
"""
import math
from dataclasses import dataclass

import torch


@dataclass
class Term:
    """One named loss term of a method: value (0-dim tensor), its weight λ, and whether the value is
    this micro-batch's share of a step-level mean (summed over micro-batches) or a per-micro-batch
    mean (averaged over them, like L_CE)."""
    value: torch.Tensor
    weight: float
    step_share: bool = False


def step_loss(out, terms, *, lb_weight, z_weight, n_micro, ce_weight=1.0, poison=False):
    """-> (loss, logged). loss: this micro-batch's contribution to the step's eq. 12 loss, to call
    .backward() on (the sum over the step's micro-batches is the step's loss). logged: {name: detached
    0-dim tensor}, each the micro-batch's share of the step's value of that term ("loss": the total).
    out: the model's output (loss = L_CE, aux_loss = L_LB, z_loss = L_z, None where the model has none);
    terms: {name: Term} from the method (methods/), {} for none. poison: multiply by NaN (a test of
    the non-finite guard). ce_weight: the weight of L_CE (1; ShifCon's authors use 0.5); "ce" is logged unweighted."""
    lb = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=out.loss.device)
    parts = dict(ce=out.loss, lb=lb)
    # eq. 12: L = L_CE + λ_LB · L_LB (+ λ_z · L_z) + Σ_m λ_m · L_m
    # (ce_weight 1.0: x 1.0 is exact, bit-identical to L_CE alone)
    total = ce_weight * out.loss + lb_weight * lb + (z_weight * out.z_loss if out.z_loss is not None else 0.0)
    for name, term in terms.items():
        parts[name] = term.value
        if term.weight > 0:  # weight 0: logged, never part of the total (bit-identical to no term)
            total = total + term.weight * term.value * (n_micro if term.step_share else 1)
    if poison:
        total = total * math.nan
    logged = {k: v.detach() * (n_micro if k in terms and terms[k].step_share else 1) / n_micro for k, v in parts.items()}
    logged["loss"] = total.detach() / n_micro
    return total / n_micro, logged
