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

import json
import math
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.parallel import IGNORE_INDEX
from methods.base import Component
from sara_loss import sara_loss
from step_loss import Term

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

    def add(self, lang, position, sum_H, count):
        """Add `count` batches whose batch means sum to sum_H (what ShifCon.end_step gathers over ranks)."""
        key = (lang, int(position))
        sum_H = sum_H.detach().to(torch.float64).cpu()
        if key in self._sum and self._sum[key].shape != sum_H.shape:
            raise ValueError(f"{key}: hidden size {sum_H.shape[0]} differs from the stored {self._sum[key].shape[0]}")
        self._sum[key] = self._sum[key] + sum_H if key in self._sum else sum_H.clone()
        self._count[key] = self._count.get(key, 0) + int(count)

    def languages(self):
        return sorted({lang for lang, _ in self._sum})

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

    def to_json(self):
        """{"lang@position": {"sum": [H floats], "count": n}}: exact (JSON keeps a float64 bit for bit)."""
        return {f"{lang}@{p}": dict(sum=s.tolist(), count=self._count[(lang, p)]) for (lang, p), s in sorted(self._sum.items())}

    @classmethod
    def from_json(cls, obj, where="language vectors"):
        out = cls()
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object of 'lang@position' entries")
        for key, entry in obj.items():
            lang, _, p = key.rpartition("@")
            if not lang or not p.isdigit() or not isinstance(entry, dict) or set(entry) != {"sum", "count"}:
                raise ValueError(f"{where}: entry {key!r} must be 'lang@position': {{'sum': [...], 'count': n}}")
            try:
                s = torch.tensor(entry["sum"], dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{where}: entry {key!r}: 'sum' must be a list of numbers") from None
            if s.dim() != 1 or not torch.isfinite(s).all() or type(entry["count"]) is not int or entry["count"] < 1:
                raise ValueError(f"{where}: entry {key!r} needs a finite vector and a count >= 1")
            out._sum[(lang, int(p))], out._count[(lang, int(p))] = s, entry["count"]
        return out

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

class ShiftHook:
    """A residual_hook for model.MoETransformer that shifts every non-English row into English's subspace
    and back, as their code does:
        before decoder layer forward − 1:  h <- h − v_lang[forward] + v_English[forward]
        before decoder layer back − 1:     h <- h − v_English[back] + v_lang[back]
    (the vector measured at position p applied to the input of layer p − 1; see the module docstring).
    set_rows(langs) before every forward: one language code per row of the batch (None or English: the row
    is untouched, bit for bit; the list serves that one forward), or one code for all rows and every
    forward (generation, where the batch size changes). A forward whose row count differs from the codes
    given, or a second forward without new codes, is an error, never a silent misalignment.
    record: residual positions whose input (B, T, H) is kept in .recorded, with its graph, at each forward
    (the training component reads its contrastive term and vector updates from them). Install with
    model.residual_hook = hook (None afterwards)."""

    def __init__(self, vectors, forward=SHIFT_FORWARD, back=SHIFT_BACK, english="en", record=()):
        if not 0 < forward < back:
            raise ValueError(f"ShifCon positions must satisfy 0 < forward < back; got forward={forward}, back={back}")
        self.vectors, self.forward, self.back, self.english = vectors, forward, back, english
        self.record, self.recorded = tuple(record), {}
        self.rows, self._table, self._keep = None, {}, None

    def set_rows(self, langs):
        self.rows = langs if isinstance(langs, str) else list(langs)

    def _prepare(self, x_BTH):
        B = x_BTH.shape[0]
        if self.rows is None:
            raise RuntimeError("ShifCon: the rows' languages were not set before the forward (ShiftHook.set_rows)")
        langs = [self.rows] * B if isinstance(self.rows, str) else self.rows
        if len(langs) != B:
            raise ValueError(f"ShifCon: a batch of {B} rows, but {len(langs)} languages were set (ShiftHook.set_rows)")
        moved = [lang is not None and lang != self.english for lang in langs]
        self._table, self._keep = {}, torch.tensor([not m for m in moved], device=x_BTH.device)[:, None, None]
        if not any(moved):
            return
        for position, into in ((self.forward, True), (self.back, False)):
            v_en = self.vectors.vector(self.english, position)
            rows = [(v_en - self.vectors.vector(lang, position)) * (1 if into else -1) if m else torch.zeros_like(v_en)
                    for lang, m in zip(langs, moved)]
            self._table[position - 1] = torch.stack(rows)[:, None, :]  # (B, 1, H) float64: zero on unshifted rows

    def __call__(self, p, x_BTH):
        if p == 0:
            self.recorded = {}
            self._prepare(x_BTH)
            if not isinstance(self.rows, str):  # one batch's languages serve one forward: a stale list is never reused
                self.rows = None
        if p in self.record:
            self.recorded[p] = x_BTH
        if p not in self._table:
            return x_BTH
        d_B1H = self._table[p].to(device=x_BTH.device, dtype=x_BTH.dtype)
        return torch.where(self._keep, x_BTH, x_BTH + d_B1H)  # unshifted rows: the same values, untouched


def shift_hook(vectors, langs, forward=SHIFT_FORWARD, back=SHIFT_BACK, english="en"):
    """A ShiftHook with the rows' languages set: model.residual_hook = shift_hook(vectors, ["sw", "en"])."""
    hook = ShiftHook(vectors, forward, back, english)
    hook.set_rows(langs)
    return hook


# -----------------------------------------------------------------------------
# the file inference reads (next to the exported weights)

VECTORS_FILE = "shifcon.json"


def save_vectors(path, vectors, forward, back, english):
    with open(path, "w") as f:
        json.dump(dict(format="shifcon-language-vectors", forward=forward, back=back, english=english,
                       vectors=vectors.to_json()), f)


def load_shift_hook(path, config):
    """-> ShiftHook from a shifcon.json, checked against the model's config (hidden size, layer count)
    and for English and every language at both positions; errors name the file and the entry."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable ShifCon vectors file ({err})") from None
    if not isinstance(obj, dict) or obj.get("format") != "shifcon-language-vectors":
        raise ValueError(f"{path}: not a ShifCon vectors file (format must be 'shifcon-language-vectors')")
    forward, back, english = obj.get("forward"), obj.get("back"), obj.get("english")
    if not (type(forward) is int and type(back) is int and 0 < forward < back <= config.n_layers):
        raise ValueError(f"{path}: positions forward={forward!r}, back={back!r} must satisfy 0 < forward < back <= "
                         f"{config.n_layers} (the model's layers)")
    vectors = LanguageVectors.from_json(obj.get("vectors"), where=path)
    for lang in vectors.languages():
        for p in (forward, back):
            try:
                v = vectors.vector(lang, p)
            except KeyError:
                raise ValueError(f"{path}: language {lang!r} has no vector at position {p}") from None
            if v.shape[0] != config.hidden_size:
                raise ValueError(f"{path}: vector {lang}@{p} has {v.shape[0]} values; the model's hidden size is "
                                 f"{config.hidden_size}")
    if english not in vectors.languages():
        raise ValueError(f"{path}: no vectors for its English language {english!r}")
    return ShiftHook(vectors, forward, back, english)


def find_vectors(checkpoint):
    """The shifcon.json of a checkpoint directory, or None (a model trained without ShifCon)."""
    path = os.path.join(str(checkpoint), VECTORS_FILE)
    return path if os.path.isdir(str(checkpoint)) and os.path.exists(path) else None


# -----------------------------------------------------------------------------
# the training component (method=shifcon; docs/method.md, "Alignment methods")

def default_positions(band_layers):
    """(l_f, l_b) from the SARA band's decoder layers: the band's layers are the ones that run shifted
    (shift before the band's first layer, back after its last): (first + 1, last + 2)."""
    return min(band_layers) + 1, max(band_layers) + 2


class ShifCon(Component):
    """ShifCon in the loop. Every micro-batch's ONE forward holds [the micro-batch's rows (shifted, with
    labels: L_CE, their instruction batch); a contrastive batch of up to `contrastive_batch` training pairs
    of ONE language: their English sources, then their target rows (unshifted, labels -100: their
    separate contrastive batch, run without the shift)], the contrastive rows cut to `contrastive_max_len`
    tokens. The contrastive batch's language is that of the micro-batch's first row; its pairs are drawn
    without replacement from that language's training pairs by a generator seeded with (seed, the
    micro-batch's ids), so a resumed run draws the same ones. The contrastive term and the language-vector
    updates read the contrastive batch's hidden states.
    Language vectors: a running mean over batches (one pass of the original model over the training pairs,
    then every contrastive batch of training), fixed within a step and updated at its end from every rank's
    batches (identical on every rank)."""

    def __init__(self, hook, pairs, band, hidden_size, scale, ce_weight, contrastive_weight, contrastive_batch=12,
                 contrastive_max_len=128, seed=0):
        self.hook, self.band, self.scale = hook, band, scale
        self.ce_weight, self.weight = ce_weight, contrastive_weight
        self.pairs = {}  # lang -> the training rows of that language with an English source
        for e in pairs:
            if e["has_anchor"]:
                self.pairs.setdefault(e["lang"], []).append(e)
        self.contrastive_batch, self.contrastive_max_len, self.seed = contrastive_batch, contrastive_max_len, seed
        self.keys = [(lang, p) for lang in sorted(self.pairs) + [hook.english] for p in (hook.forward, hook.back)]
        self.hidden_size = hidden_size
        self._contrast = None  # (lang, number of pairs) of the current micro-batch's contrastive batch
        self._reset_pending()

    def _reset_pending(self):
        """This step's sums of batch means (K, H) float64 and batch counts (K,), one row per (language, position)
        (K fixed: every rank all-reduces the same shapes, whichever languages its micro-batches held)."""
        self._pending = (torch.zeros(len(self.keys), self.hidden_size, dtype=torch.float64),
                         torch.zeros(len(self.keys), dtype=torch.float64))

    @classmethod
    def prepare(cls, run, net, examples, band, positions):
        """The language vectors' start: one pass of the ORIGINAL model (eval mode, no grad, no shift) over the
        training pairs, in micro_batch batches of one language; every rank runs every batch (FSDP needs the
        same forwards on all ranks) and rank 0's sums are shared. Installs the hook on the model."""
        s = run.s
        forward, back = positions
        core = net.module if hasattr(net, "module") else net
        hook = ShiftHook(LanguageVectors(), forward, back, s.anchor_lang, record=range(forward, back + 1))
        self = cls(hook, examples, band, core.config.hidden_size, s.shifcon_scale, s.shifcon_ce_weight,
                   s.shifcon_contrastive_weight, s.shifcon_contrastive_batch, s.shifcon_contrastive_max_len, s.seed)
        missing = [lang for lang in s.train_langs if lang not in self.pairs]
        if missing:  # (train.py checks this before the model loads)
            raise ValueError(f"ShifCon: no training pair of {missing}: no language vector to shift by")
        core.residual_hook = hook
        from data.parallel import collate
        was_training = net.training
        net.eval()
        with torch.no_grad():
            for lang in sorted(self.pairs):
                rows = self.pairs[lang]
                for i in range(0, len(rows), s.micro_batch):
                    seqs = self._contrast_rows(rows[i:i + s.micro_batch])
                    batch = {k: v.to(run.dist.device) for k, v in collate(seqs, run.pad_id).items()}
                    hook.set_rows([None] * len(seqs))
                    with run.autocast:
                        net(batch["input_ids"], attention_mask=batch["attention_mask"] if len(seqs) > 1 else None)
                    if run.dist.rank == 0:
                        n = len(seqs) // 2
                        self._gather(lang, list(range(n, 2 * n)), list(range(n)), batch["attention_mask"])
        net.train(was_training)
        hook.recorded = {}
        if hasattr(net, "reshard"):  # FSDP2 keeps the root's parameters gathered after a forward no backward follows
            net.reshard()
        self.end_step(run)
        return self

    def _contrast_rows(self, pairs):
        """[English sources; target rows] of the pairs, cut to contrastive_max_len tokens, labels -100."""
        cut = self.contrastive_max_len
        return ([dict(input_ids=e["anchor_input_ids"][:cut], labels=[IGNORE_INDEX] * len(e["anchor_input_ids"][:cut]))
                 for e in pairs]
                + [dict(input_ids=e["input_ids"][:cut], labels=[IGNORE_INDEX] * len(e["input_ids"][:cut])) for e in pairs])

    def contrastive_pairs(self, micro):
        """The contrastive batch of a micro-batch: pairs of its first row's language, a seeded draw (see the class)."""
        lang = micro[0]["lang"]
        pool = self.pairs.get(lang, [])
        rng = random.Random(f"{self.seed}:" + " ".join(e["id"] for e in micro))
        return lang, rng.sample(pool, min(self.contrastive_batch, len(pool)))

    def _gather(self, lang, target_rows, english_rows, mask_BT):
        """Add one batch of `lang` (target rows and their English rows of the last forward) to the step's sums."""
        sums, counts = self._pending
        with torch.no_grad():
            for p in (self.hook.forward, self.hook.back):
                h_BTH = self.hook.recorded[p]
                for who, rows in ((lang, target_rows), (self.hook.english, english_rows)):
                    idx = torch.tensor(rows, device=h_BTH.device)
                    u_BH = sentence_vectors(h_BTH[idx].float(), None if mask_BT is None else mask_BT[idx])
                    k = self.keys.index((who, p))
                    sums[k] += u_BH.double().mean(0).cpu()
                    counts[k] += 1

    def extend_batch(self, micro):
        """The micro-batch's contrastive batch: English sources, then target rows; labels all -100."""
        lang, pairs = self.contrastive_pairs(micro)
        self._contrast = (lang, len(pairs))
        return self._contrast_rows(pairs)

    def set_rows(self, langs):
        self.hook.set_rows(langs)

    def loss(self, out, batch, net, run):
        n, (lang, k), mask = len(batch["examples"]), self._contrast, batch["mask"]
        english_rows, target_rows = list(range(n, n + k)), list(range(n + k, n + 2 * k))
        value = torch.zeros((), device=out.loss.device)
        if k >= 1:
            self._gather(lang, target_rows, english_rows, mask)
        if k >= 2:  # (one pair has no negative: InfoNCE is log 1 = 0)
            en_idx, tgt_idx = (torch.tensor(r, device=out.loss.device) for r in (english_rows, target_rows))
            positions = range(self.hook.forward, self.hook.back)
            value = shifcon_contrastive(
                [self.hook.recorded[p][en_idx].float() for p in positions], None if mask is None else mask[en_idx],
                [self.hook.recorded[p][tgt_idx].float() for p in positions], None if mask is None else mask[tgt_idx],
                self.scale)
        self.hook.recorded = {}  # (the graph keeps what the backward needs; nothing else stays alive)
        return dict(contrastive=Term(value, self.weight))

    def end_step(self, run):
        """The step's batch means (summed over ranks: a collective, every rank calls it) join the running means;
        identical on every rank."""
        sums, counts = self._pending
        if run.dist.ddp:
            both = torch.cat([sums, counts[:, None]], 1).to(run.dist.device)
            dist.all_reduce(both)
            sums, counts = both[:, :-1].cpu(), both[:, -1].cpu()
        for (lang, p), s_H, c in zip(self.keys, sums, counts.tolist()):
            if c > 0:
                self.hook.vectors.add(lang, p, s_H, round(c))
        self._reset_pending()

    def evaluate(self, net, examples, pooled, run):
        """val_js: band JS between the held-out target rows' routing (shifted, as pooled by the loop) and
        their English sources' under the current model (unshifted: English)."""
        from anchors import forward_and_pool
        has = [i for i, e in enumerate(examples) if e["has_anchor"]]
        if not has:
            return {}
        english = forward_and_pool(net, [examples[i]["anchor_input_ids"] for i in has], pad_id=run.pad_id,
                                   batch_size=run.s.micro_batch, autocast=run.autocast, device=run.dist.device,
                                   before_batch=lambda rows: self.hook.set_rows([None] * len(has[rows])))
        return dict(val_js=sara_loss(pooled.routing[has], english.routing, self.band, check=False).item())

    def describe(self, res):
        return f"  val JS(band, current English) {res.get('val_js', math.nan):.4f}"

    def state_dict(self):
        return dict(vectors=self.hook.vectors.to_json())

    def load_state_dict(self, state):
        if not state or "vectors" not in state:
            raise ValueError("a ShifCon run's checkpoint must hold its language vectors (method_state.vectors)")
        self.hook.vectors = LanguageVectors.from_json(state["vectors"], where="checkpoint method_state")

    def export_files(self, out_dir):
        path = os.path.join(out_dir, VECTORS_FILE)
        save_vectors(path, self.hook.vectors, self.hook.forward, self.hook.back, self.hook.english)
        return [path]


def install_for_inference(model, checkpoint, langs, mode="auto", unshifted="run it with its shift off"):
    """The shift of a ShifCon checkpoint (its shifcon.json) on model.residual_hook, for eval.py and sample.py.
    -> the ShiftHook (call .set_rows(lang) before each language's prompts), or None: no shifcon.json, or
    mode "off" (the model run without its shift, for analysis). A language without a vector is an error
    before any prompt runs (its remedy, `unshifted`, in the caller's words). Languages are matched exactly,
    as in the training data."""
    path = find_vectors(checkpoint)
    if path is None or mode == "off":
        return None
    hook = load_shift_hook(path, model.config)
    unknown = [l for l in langs if l != hook.english and l not in hook.vectors.languages()]
    if unknown:
        raise ValueError(f"{path}: no language vector for {unknown} (it has {hook.vectors.languages()}): this ShifCon "
                         f"model was not trained on them; {unshifted} to run them unshifted")
    model.residual_hook = hook
    return hook
