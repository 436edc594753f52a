"""
Parallel instruction data for SARA: load, split, tokenize, collate.

File format (JSONL, one object per line, UTF-8; blank lines are ignored; extra keys are kept):
  {"id": "udhr-a03-p01-sw",   # unique; "<group>-<lang>" (see below)
   "lang": "sw",              # language of prompt/response
   "prompt": str,             # user turn (may be empty)
   "response": str,           # assistant turn, non-empty; the CE loss is taken on it only
   "anchor_lang": "en",       # language of the anchor side
   "anchor_prompt": str | null, "anchor_response": str | null}  # both null or both strings
The anchor pair is the same item in the anchor language; SARA's routing prior is computed from it
(docs/method.md, stage 2). A row without an anchor has both fields null and is never given a fake one:
tokenize_samples marks it has_anchor=False and counts it, and the JS term must skip it.
Anchor-language rows (lang == anchor_lang) are their own anchor.

Id convention: id = "<group>-<lang>", where <group> is the same for one item in every language
(e.g. "udhr-a03-p01" for UDHR article 3 paragraph 1). group_key() relies on it: the train/val split
is by group, so no item is in train in one language and in val in another. The committed data is
data/udhr/parallel.jsonl (rebuilt by data/udhr/prepare.py).

Notation: B batch size, T padded sequence length. Labels follow the Hugging Face convention: aligned
with input_ids (the model shifts them), -100 = no loss (prompt tokens and padding).
"""

import hashlib
import json

import torch

IGNORE_INDEX = -100
_FIELDS = {"id": str, "lang": str, "prompt": str, "response": str, "anchor_lang": str}
_ANCHOR_FIELDS = ("anchor_prompt", "anchor_response")


# -----------------------------------------------------------------------------
# load and split
def _check_sample(obj):
    """-> None if obj is a valid sample, else what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key, typ in _FIELDS.items():
        if key not in obj:
            return f"missing key {key!r}"
        if not isinstance(obj[key], typ):
            return f"{key!r} must be a string, got {type(obj[key]).__name__}"
    for key in _ANCHOR_FIELDS:
        if key not in obj:
            return f"missing key {key!r}"
        if obj[key] is not None and not isinstance(obj[key], str):
            return f"{key!r} must be a string or null, got {type(obj[key]).__name__}"
    if not obj["id"] or not obj["lang"]:
        return "'id' and 'lang' must be non-empty"
    if not obj["id"].endswith("-" + obj["lang"]) or obj["id"] == "-" + obj["lang"]:  # group_key() needs it
        return (f"id {obj['id']!r} does not have the form '<group>-<lang>' ('<group>-{obj['lang']}'): the same "
                "<group> names one item in every language (the train/val split and re-anchoring rely on it)")
    if not obj["response"].strip():
        return "'response' is empty"
    if (obj["anchor_prompt"] is None) != (obj["anchor_response"] is None):
        return "'anchor_prompt' and 'anchor_response' must both be null or both be strings"
    if obj["anchor_response"] is not None and not obj["anchor_response"].strip():
        return "'anchor_response' is empty (use null for no anchor)"
    return None


def load_parallel_jsonl(path):
    """-> list of sample dicts. Raises ValueError "path:LINE: what is wrong" for the first bad line."""
    samples, first_line = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
            problem = _check_sample(obj)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            if obj["id"] in first_line:
                raise ValueError(f"{path}:{lineno}: duplicate id {obj['id']!r} "
                                 f"(first on line {first_line[obj['id']]})")
            first_line[obj["id"]] = lineno
            samples.append(obj)
    return samples


def group_key(sample):
    """The id without its "-<lang>" suffix: the same item in every language shares it."""
    suffix = "-" + sample["lang"]
    if not sample["id"].endswith(suffix) or len(sample["id"]) == len(suffix):
        raise ValueError(f"id {sample['id']!r} does not end with '-<lang>' ({suffix!r}); "
                         "pass split_train_val a group_key function")
    return sample["id"][:-len(suffix)]


def split_train_val(samples, val_fraction, seed=0, group_key=group_key):
    """Deterministic split by group -> (train, val), each in input order. Groups are ranked by
    sha256(seed, group); the first round(val_fraction * n_groups) (at least 1 if val_fraction > 0)
    go to val. Every sample of a group lands on the same side."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = sorted({group_key(s) for s in samples},
                    key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n_val = max(1, round(val_fraction * len(groups))) if val_fraction > 0 and groups else 0
    val_groups = set(groups[:n_val])
    train = [s for s in samples if group_key(s) not in val_groups]
    val = [s for s in samples if group_key(s) in val_groups]
    return train, val


def with_anchor_lang(samples, anchor_lang, group_key=group_key):
    """Re-anchor on another language (e.g. the zh track): each sample's anchor becomes the
    prompt/response of the sample of the same group in `anchor_lang`; null if there is none."""
    anchors = {group_key(s): s for s in samples if s["lang"] == anchor_lang}
    out = []
    for s in samples:
        a = anchors.get(group_key(s))
        out.append({**s, "anchor_lang": anchor_lang,
                    "anchor_prompt": a["prompt"] if a else None,
                    "anchor_response": a["response"] if a else None})
    return out


# -----------------------------------------------------------------------------
# tokenize
def tokenize_sample(tok, prompt, response, max_len, system=None):
    """-> (input_ids, labels), two lists of length <= max_len. Chat format applied; labels are
    IGNORE_INDEX on the prompt and the response ids (incl. end-of-turn) elsewhere. Truncated from
    the right; raises ValueError if not even one response token would survive (the prompt alone
    fills max_len): such a sample has nothing to learn from and must be skipped by the caller."""
    return _cut(*tok.encode_chat(prompt, response, system=system), max_len)


def _cut(prompt_ids, response_ids, max_len):
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt is {len(prompt_ids)} tokens, max_len {max_len}: "
                         "no response token would remain")
    input_ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    return input_ids, labels


def tokenize_anchor(tok, sample, max_len, system=None):
    """The anchor side of a sample (anchor_prompt + anchor_response, same chat format) -> input_ids
    truncated to max_len, or None if the sample has no anchor. SARA's routing prior is the mean
    over all of these tokens, so no labels are needed."""
    if sample["anchor_response"] is None:
        return None
    prompt_ids, response_ids = tok.encode_chat(sample["anchor_prompt"], sample["anchor_response"],
                                               system=system)
    return (prompt_ids + response_ids)[:max_len]


def tokenize_samples(tok, samples, max_len, system=None):
    """-> (examples, stats). One example per usable sample: {"id", "lang", "input_ids", "labels",
    "anchor_input_ids" (list or None), "has_anchor"}. Samples whose prompt fills max_len are
    skipped; stats = {"samples", "kept", "skipped_too_long", "truncated", "no_anchor"} (counts over
    kept; "truncated": kept samples whose response was cut at max_len, e.g. losing a final answer)."""
    examples, skipped, truncated = [], 0, 0
    for s in samples:
        prompt_ids, response_ids = tok.encode_chat(s["prompt"], s["response"], system=system)
        try:
            input_ids, labels = _cut(prompt_ids, response_ids, max_len)
        except ValueError:
            skipped += 1
            continue
        truncated += len(prompt_ids) + len(response_ids) > max_len
        anchor = tokenize_anchor(tok, s, max_len, system)
        examples.append(dict(id=s["id"], lang=s["lang"], input_ids=input_ids, labels=labels,
                             anchor_input_ids=anchor, has_anchor=anchor is not None))
    stats = dict(samples=len(samples), kept=len(examples), skipped_too_long=skipped, truncated=truncated,
                 no_anchor=sum(not e["has_anchor"] for e in examples))
    return examples, stats


# -----------------------------------------------------------------------------
# batch
def collate(batch, pad_id, padding_side="right", pad_to_multiple_of=1):
    """batch: list of dicts with "input_ids" (list[int]) and optionally "labels" (list[int], same
    length) -> {"input_ids": (B, T) long, "attention_mask": (B, T) long (1 = real token),
    "labels": (B, T) long with IGNORE_INDEX on padding (only if every item has labels)}.
    T = the longest item, rounded up to a multiple of pad_to_multiple_of. With left padding the
    model must take position ids from attention_mask (cumsum - 1), not from arange(T)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(b["input_ids"]) for b in batch)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    with_labels = all(b.get("labels") is not None for b in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[i, span] = torch.tensor(b["input_ids"], dtype=torch.long)
        attention_mask[i, span] = 1
        if with_labels:
            assert len(b["labels"]) == n, "labels and input_ids differ in length"
            labels[i, span] = torch.tensor(b["labels"], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels:
        out["labels"] = labels
    return out


# -----------------------------------------------------------------------------
# the order of training
def step_batches(n_examples, n_steps, start_step, global_batch, micro_batch, seed):
    """-> iterator of (step, micro-batches) for optimizer steps start_step..n_steps-1, each a list
    of global_batch // micro_batch lists of example indices (micro-batch j goes to rank j % world,
    so every rank can see the whole step). The order is a function of (seed, epoch) only: a resumed
    run, a run on another number of ranks, and a run with another lambda_js see the same data."""
    if global_batch % micro_batch:
        raise ValueError(f"global_batch={global_batch} is not a multiple of micro_batch={micro_batch}")
    steps_per_epoch = max(1, n_examples // global_batch)
    for step in range(start_step, n_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        chunk = perm[pos * global_batch:(pos + 1) * global_batch]
        while len(chunk) < global_batch:  # fewer examples than global_batch: wrap around (as often as needed)
            chunk += perm[:global_batch - len(chunk)]
        yield step, [chunk[j:j + micro_batch] for j in range(0, global_batch, micro_batch)]

