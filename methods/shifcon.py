"""ShifCon (Zhang et al., ACL 2025, arXiv 2410.19453), one of the SARA paper's two baselines. Public
code: the first commit of github.com/rattlesnakey/ShifCon (src/finetune_contrast.py,
src/model_forward_fn.py, pipeline_train_eval.sh), written for dense LLaMA. It acts only on the
residual stream, so it applies to an MoE model unchanged.

Idea: move a non-English sequence's hidden states into the "English subspace" for a few middle
layers (subtract its language's mean vector, add English's), shift them back afterwards, and train
with a contrastive term that pulls parallel sentences together inside that window.

Notation: B sequences, T tokens, H hidden size. A residual-stream POSITION p is the hidden state that
enters decoder layer p (0-based); p = 0 is the embeddings, and p is what Hugging Face returns as
output_hidden_states[p]. l_f < l_b are the shift positions ("layer_to_shift_forward / _back").

In our words:
- Sentence vector at position p: the mean over real (non-pad) tokens of the hidden states,
  L2-normalised:  u = normalise(Σ_t m_t h_t / Σ_t m_t).
- Language vector v_lang[p]: the mean over contrastive batches of the batch mean of u (each batch
  weighted equally), for p = l_f and p = l_b; updated in training, saved, reused at inference
  (LanguageVectors).
- Shift, for non-English inputs, training and inference:
      at l_f:  h <- h − v_target[l_f] + v_English[l_f]     (into the English subspace)
      at l_b:  h <- h − v_English[l_b] + v_target[l_b]     (back)
  on every token. NOTE (their code): the vector measured at position p is applied one position
  earlier, to the input of decoder layer p − 1 (their loop shifts when i == p − 1, before layer i
  runs, with the vector computed from output_hidden_states[p]). A faithful port keeps that.
- Contrastive term, on a separate batch of B parallel (English, target) pairs of ONE target
  language, run WITHOUT the shift: at each position p in [l_f, l_b),
      e = u_English (B, H),  g = u_target − mean_b(u_target) + mean_b(u_English)   (not renormalised)
      logits = scale · e gᵀ (B, B);  InfoNCE_p = ½ (CE(logits, diag) + CE(logitsᵀ, diag))
  and the term is the mean over those positions. Gradients flow through both sides and through the
  batch means; the language vectors are detached.
- Loss = 0.5 · CE (on the shifted instruction batch) + 2.0 · contrastive.

Defaults of the authors' code (pipeline_train_eval.sh; argparse defaults in brackets): l_f = 12,
l_b = 15 for a 32-layer LLaMA-2-7B [15, 20] (the paper picks them with a subspace-distance metric);
scale 1.0; CE weight 0.5 and contrastive weight 2.0 [1.0, 1.0]; contrastive batch 12 [32], English
≤ 100 and target ≤ 256 tokens; lr 1e-5, 1 epoch, total batch 56, cosine, warmup 0.01, LoRA, ZeRO-3.

Decisions (ours):
- During training their shift adds the running SUMS of the batch means (the division by the count
  happens only when the vectors are saved for inference), so the training-time shift grows with
  the number of batches seen. We shift by the running MEAN in training and inference alike (what
  their inference does); LanguageVectors.sums_and_counts() gives the raw sums for a faithful rerun.
- Normalisation uses F.normalize (eps 1e-12) where their code divides by the norm: equal for any
  vector of norm > 1e-12, finite for an all-zero one.
"""

import torch
import torch.nn.functional as F

SHIFT_FORWARD = 12  # l_f, their LLaMA-2-7B (32 layers) example
SHIFT_BACK = 15  # l_b
SCALE = 1.0  # logits = scale · e gᵀ
CE_WEIGHT = 0.5
CONTRASTIVE_WEIGHT = 2.0


# -----------------------------------------------------------------------------
# sentence vectors, shift, contrastive term

def pool_hidden(hidden_BTH, mask_BT=None):
    """Mean of the hidden states over the real tokens of each sequence: (B, T, H) -> (B, H)."""
    if hidden_BTH.dim() != 3:
        raise ValueError(f"hidden_BTH must be (B, T, H); got {tuple(hidden_BTH.shape)}")
    if mask_BT is None:
        return hidden_BTH.mean(1)
    if tuple(mask_BT.shape) != tuple(hidden_BTH.shape[:2]):
        raise ValueError(f"mask_BT {tuple(mask_BT.shape)} must be (B, T) = {tuple(hidden_BTH.shape[:2])}")
    keep_BT1 = (mask_BT != 0)[:, :, None]
    n_B1 = keep_BT1.sum(1).to(hidden_BTH.dtype)
    return torch.where(keep_BT1, hidden_BTH, 0.0).sum(1) / n_B1


def sentence_vectors(hidden_BTH, mask_BT=None):
    """u = L2-normalised pooled hidden states, (B, H)."""
    return F.normalize(pool_hidden(hidden_BTH, mask_BT), dim=-1)


def shift(hidden_BTH, v_from_H, v_to_H):
    """h - v_from + v_to on every token. Into English: shift(h, v_target, v_en); back: shift(h, v_en, v_target)."""
    return hidden_BTH - v_from_H + v_to_H


def mean_shifted_targets(english_BH, target_BH):
    """g = u_target − mean_b(u_target) + mean_b(u_English): the target batch moved onto English's mean."""
    return target_BH - target_BH.mean(0) + english_BH.mean(0)


def symmetric_info_nce(english_BH, target_BH, scale=SCALE):
    """½ (CE(s·e gᵀ, diag) + CE(s·g eᵀ, diag)): row b of each side is the other's positive."""
    if english_BH.shape != target_BH.shape or english_BH.dim() != 2:
        raise ValueError(f"english_BH {tuple(english_BH.shape)} and target_BH {tuple(target_BH.shape)} must both be (B, H)")
    logits_BB = scale * english_BH @ target_BH.T
    diag_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return 0.5 * (F.cross_entropy(logits_BB, diag_B) + F.cross_entropy(logits_BB.T, diag_B))


def shifcon_contrastive(english_hidden, english_mask, target_hidden, target_mask, scale=SCALE):
    """Mean over positions of symmetric InfoNCE between u_English and the mean-shifted u_target.

    english_hidden, target_hidden: the hidden states at positions l_f .. l_b - 1, one (B, T, H)
        tensor per position (T may differ between the sides), from a forward WITHOUT the shift.
    english_mask, target_mask: (B, T) 1 = real token (None = all real).
    """
    if len(english_hidden) != len(target_hidden) or not english_hidden:
        raise ValueError(f"need the same non-zero number of positions on both sides; got "
                         f"{len(english_hidden)} English and {len(target_hidden)} target")
    terms = []
    for en_BTH, tgt_BTH in zip(english_hidden, target_hidden):
        e_BH = sentence_vectors(en_BTH, english_mask)
        g_BH = mean_shifted_targets(e_BH, sentence_vectors(tgt_BTH, target_mask))
        terms.append(symmetric_info_nce(e_BH, g_BH, scale))
    return torch.stack(terms).mean()


def shifcon_loss(ce, contrastive, ce_weight=CE_WEIGHT, contrastive_weight=CONTRASTIVE_WEIGHT):
    """0.5 · CE + 2.0 · contrastive (their pipeline's weights)."""
    return ce_weight * ce + contrastive_weight * contrastive


# -----------------------------------------------------------------------------
# language vectors

class LanguageVectors:
    """Running mean over batches of the batch-mean sentence vector, per (language, position).

    update(lang, position, sentence_BH) adds one batch (detached, kept in float64); vector(lang,
    position) is sum / count, in float64 (cast it to the hidden states' dtype to shift).
    state_dict() / load_state_dict() hold plain tensors and ints, for torch.save.
    """

    def __init__(self):
        self._sum = {}  # (lang, position) -> (H,) float64
        self._count = {}  # (lang, position) -> number of batches

    def update(self, lang, position, sentence_BH):
        if sentence_BH.dim() != 2 or sentence_BH.shape[0] == 0:
            raise ValueError(f"sentence_BH must be (B, H) with B > 0; got {tuple(sentence_BH.shape)}")
        key = (lang, int(position))
        batch_mean_H = sentence_BH.detach().to(torch.float64).mean(0)
        if key in self._sum and self._sum[key].shape != batch_mean_H.shape:
            raise ValueError(f"{key}: hidden size {batch_mean_H.shape[0]} differs from the stored {self._sum[key].shape[0]}")
        self._sum[key] = self._sum[key] + batch_mean_H if key in self._sum else batch_mean_H.clone()
        self._count[key] = self._count.get(key, 0) + 1

    def vector(self, lang, position):
        key = (lang, int(position))
        if key not in self._sum:
            have = sorted(self._sum)
            raise KeyError(f"no language vector for language {lang!r} at position {position}; have {have}")
        return self._sum[key] / self._count[key]

    def sums_and_counts(self):
        """{(lang, position): (sum (H,), count)}: what their training-time shift used (the sum)."""
        return {k: (self._sum[k].clone(), self._count[k]) for k in self._sum}

    def state_dict(self):
        return {"sums": {f"{lang}@{p}": s.clone() for (lang, p), s in self._sum.items()},
                "counts": {f"{lang}@{p}": c for (lang, p), c in self._count.items()}}

    def load_state_dict(self, state):
        if set(state.get("sums", {})) != set(state.get("counts", {})):
            raise ValueError("language-vector state: 'sums' and 'counts' must have the same keys")
        self._sum, self._count = {}, {}
        for key, s in state["sums"].items():
            lang, _, p = key.rpartition("@")
            self._sum[(lang, int(p))] = s.to(torch.float64).clone()
            self._count[(lang, int(p))] = int(state["counts"][key])


# -----------------------------------------------------------------------------
# the shift in the model's forward (model.MoETransformer.residual_hook)

def shift_hook(vectors, langs, forward=SHIFT_FORWARD, back=SHIFT_BACK, english="en"):
    """A residual_hook for model.MoETransformer: every row b with langs[b] != english is shifted into
    English's subspace and back, as their code does:
        before decoder layer forward − 1:  h <- h − v_lang[forward] + v_English[forward]
        before decoder layer back − 1:     h <- h − v_English[back] + v_lang[back]
    (the vector measured at position p applied to the input of layer p − 1; see the module docstring);
    English rows are untouched, bit for bit. vectors: LanguageVectors; langs: one code per row of the batch.
    Set it with model.residual_hook = shift_hook(...) (and None afterwards)."""
    if not 0 < forward < back:
        raise ValueError(f"ShifCon positions must satisfy 0 < forward < back; got forward={forward}, back={back}")
    shifted = [l != english for l in langs]

    def delta(position, into):  # (B, 1, H) float64: zero on English rows
        rows = []
        for lang, moved in zip(langs, shifted):
            if not moved:
                rows.append(None)
                continue
            v_en, v_l = vectors.vector(english, position), vectors.vector(lang, position)
            rows.append(v_en - v_l if into else v_l - v_en)
        H = next(r for r in rows if r is not None).shape[0] if any(shifted) else 0
        return torch.stack([r if r is not None else torch.zeros(H, dtype=torch.float64) for r in rows])[:, None, :]

    table = {forward - 1: delta(forward, True), back - 1: delta(back, False)} if any(shifted) else {}

    def hook(p, x_BTH):
        if p not in table:
            return x_BTH
        d_B1H = table[p].to(device=x_BTH.device, dtype=x_BTH.dtype)
        keep_B11 = torch.tensor([not s for s in shifted], device=x_BTH.device)[:, None, None]
        return torch.where(keep_B11, x_BTH, x_BTH + d_B1H)  # English rows: the same tensor values, untouched
    return hook
