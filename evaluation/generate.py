"""
The model's side of the benchmarks: batched generation (the paper's generative protocol) and the
log-likelihood of each answer option (the fast multiple-choice protocol). A responder is
respond(prompts, run) -> one output per prompt: a generated text, or 4 log-likelihoods.

- generative (the paper's): zero-shot, chat template, the model reasons and writes its answer in \\boxed{};
  temperature 0.1, top-p 1, run r samples with torch.Generator seeded seed + r (temperature 0 = greedy).
  Batched with left padding and the KV cache (model.generate); prompts run longest first.
- loglik (multiple choice only): the assistant's reply is the letter; the prediction is the argmax over A-D
  of log p(letter tokens | prompt) (end-of-turn excluded). Deterministic: one run.
- harness (lm-evaluation-harness's way, chat=False): the prompt is plain text (BOS if the tokenizer has one,
  no chat template); multiple choice scores the continuations " A".." D" (the harness's target delimiter is
  a space; the continuation's tokens are those of prompt + " A" past the prompt's), MGSM generates greedily.
Every prompt is checked against the model's context (model.context_problem) before anything is generated:
the generative protocols need prompt + max_new_tokens to fit, the log-likelihood ones prompt + option.
Any other engine (e.g. an OpenAI-compatible server) plugs in as a responder with the same signature.
"""
import json
import pickle
import time
from pathlib import Path

import torch

from data.parallel import collate
from evaluation.scoring import LETTERS
from model import context_problem


def peek_context(checkpoint):
    """The model's context (max_position_embeddings) without reading the weights, so a prompt that cannot
    fit is refused before the load: a directory's config.json, or a .pt's config entry (torch.load with
    mmap=True maps the tensors without reading them). None where it cannot be read: the loader then names
    what is wrong, and the context is checked after loading."""
    from checkpoint import config_from_hf
    from model import MoEConfig
    path = Path(checkpoint)
    try:
        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return MoEConfig.from_dict(state["config"]).max_position_embeddings
        return config_from_hf(json.loads((path / "config.json").read_text())).max_position_embeddings
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError):
        return None  # the loader reports what is wrong with the file, precisely


def encode_prompt(tok, prompt, *, chat=True, system=None):
    """A prompt -> its ids: the chat format's user turn + generation prompt, or (chat=False) plain text."""
    if chat:
        return tok.encode_chat(prompt, None, system=system)[0]
    return ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(prompt)


def encode_option(tok, prompt, option, *, chat=True, system=None):
    """-> (prompt ids, option ids): the option as the assistant's reply (end-of-turn excluded), or
    (chat=False) as the continuation " <option>" of the plain prompt: the tokens of prompt + " <option>"
    past as many as the prompt alone has (the harness's split, also where a token crosses the boundary)."""
    if chat:
        prompt_ids, reply = tok.encode_chat(prompt, option, system=system)
        return prompt_ids, (reply[:-1] if reply and reply[-1] == tok.eos_id else reply)
    prompt_ids = encode_prompt(tok, prompt, chat=False)
    return prompt_ids, encode_prompt(tok, prompt + " " + option, chat=False)[len(prompt_ids):]


def check_context(lengths, max_new_tokens, context, prompts):
    """ValueError naming the first prompt that does not fit the context (model.context_problem)."""
    for i, n in enumerate(lengths):
        problem = context_problem(n, max_new_tokens, context, what=f"prompt {i} ({prompts[i][:60]!r}...)")
        if problem:
            raise ValueError(problem)


def generate_batch(model, prompt_ids, max_new_tokens, temperature, top_p, stop_ids, generator=None):
    """A list of prompt id lists -> a list of new-token id lists (stop id removed), one model.generate
    call with left padding (the prompts keep their own positions: position ids come from the mask)."""
    device = next(model.parameters()).device
    batch = collate([dict(input_ids=p) for p in prompt_ids], pad_id=0, padding_side="left")
    out = model.generate(batch["input_ids"].to(device), max_new_tokens,
                         attention_mask=batch["attention_mask"].to(device), temperature=temperature,
                         top_p=top_p, stop_ids=stop_ids, generator=generator)
    return [row[:-1] if row and row[-1] in stop_ids else row for row in out]


def make_generative_responder(model, tok, *, max_new_tokens=1024, temperature=0.1, top_p=1.0,
                              batch_size=16, seed=0, system=None, chat=True, progress=None, every_s=30.0):
    """-> respond(prompts, run) -> list of generated texts. Prompts are run longest first in batches of
    batch_size; run r samples with torch.Generator seeded seed + r (temperature 0 = greedy). chat=False:
    plain-text prompts (the harness protocol). progress: called with a line at most every every_s seconds
    (and after the last batch): prompts done, rate."""
    model.eval()
    device = next(model.parameters()).device
    context = model.config.max_position_embeddings

    def respond(prompts, run):
        ids = [encode_prompt(tok, p, chat=chat, system=system) for p in prompts]
        check_context([len(i) for i in ids], max_new_tokens, context, prompts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        generator = torch.Generator(device).manual_seed(seed + run)
        texts = [None] * len(ids)
        t0 = last = time.time()
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            new = generate_batch(model, [ids[i] for i in chunk], max_new_tokens, temperature, top_p,
                                 tok.stop_ids, generator)
            for i, row in zip(chunk, new):
                texts[i] = tok.decode(row)
            done, now = start + len(chunk), time.time()
            if progress and (now - last >= every_s or done == len(order)):
                last = now
                progress(f"  run {run}: {done}/{len(order)} prompts, {done / max(now - t0, 1e-9):.2f} prompts/s")
        return texts
    return respond


@torch.no_grad()
def letter_logliks(model, tok, prompts, *, batch_size=16, system=None, options=LETTERS, chat=True):
    """-> (N, len(options)) log p(option | prompt), default options A-D: the assistant's reply is the option
    (its tokens in the chat format, end-of-turn excluded), or (chat=False) the plain continuation
    " <option>", summed over its tokens. Inputs are prompt + reply[:-1], so with one-token letters (the
    usual case) the options share one forward of the prompt."""
    model.eval()
    device = next(model.parameters()).device
    inputs, users = {}, []  # unique input ids -> index; users[index] = [(slot n*C + c, reply ids)]
    longest = [0] * len(prompts)
    for n, p in enumerate(prompts):
        for c, option in enumerate(options):
            prompt_ids, reply = encode_option(tok, p, option, chat=chat, system=system)
            longest[n] = max(longest[n], len(prompt_ids) + len(reply) - 1)
            idx = inputs.setdefault(tuple(prompt_ids + reply[:-1]), len(inputs))
            users += [[]] * (idx + 1 - len(users))
            users[idx].append((n * len(options) + c, reply))
    check_context(longest, 0, model.config.max_position_embeddings, prompts)
    inputs = list(inputs)
    need = max(len(r) for u in users for _, r in u)  # the reply of an input fills its last len(reply) positions
    out = torch.zeros(len(prompts) * len(options), dtype=torch.float64)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        batch = collate([dict(input_ids=list(s)) for s in chunk], pad_id=0, padding_side="left")
        # hidden states only: the full (b, T, V) logits of a 151k vocabulary are GBs, and scoring needs the
        # last `need` positions
        h = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  return_hidden=True).hidden  # (b, T, H)
        tail = torch.log_softmax(model.lm_head(h[:, -need:]).float(), dim=-1)  # (b, need, V), left padded
        row, pos, token, slot = [], [], [], []
        for j in range(len(chunk)):
            for s, reply in users[start + j]:
                row += [j] * len(reply)
                pos += range(need - len(reply), need)
                token += reply
                slot += [s] * len(reply)
        vals = tail[torch.tensor(row), torch.tensor(pos), torch.tensor(token, device=device)]  # one gather
        out.index_add_(0, torch.tensor(slot), vals.double().cpu())
    return out.view(len(prompts), len(options))


def make_loglik_responder(model, tok, *, batch_size=16, system=None, chat=True):
    """-> respond(prompts, run) -> list of 4 log-likelihoods per prompt (the same for every run).
    chat=False: the harness's plain continuations " A".." D"."""
    return lambda prompts, run: letter_logliks(model, tok, prompts, batch_size=batch_size, system=system,
                                               chat=chat).tolist()

