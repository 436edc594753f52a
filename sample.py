"""
Chat with a checkpoint from the command line: one user turn in the model's chat format, the
assistant's reply printed. Settings as in train.py (configurator.py): --key=value.

    python sample.py --checkpoint=DIR --prompt="Why is the sky blue?"
    python sample.py --checkpoint=DIR --prompt="..." --system="Be brief." --temperature=0.7 --top_p=0.9
    python sample.py --checkpoint=out/toy/base.pt --tokenizer=data/udhr/bpe.tiktoken --prompt="..."

--checkpoint: a Hugging Face directory (config.json, safetensors, tokenizer.json; a train.py export
has them), or train.py's toy base.pt with --tokenizer. --temperature=0 is greedy decoding.
--dtype="" keeps the checkpoint's own (bf16 for the releases).
Settings are checked before the weights are read: the sampling ones by model.sampling_problems (shared
with eval.py and stage1.py), the prompt + max_new_tokens against the model's context by
model.context_problem (a directory's config.json gives the context; a .pt is checked after loading).
"""
import sys
import time

import torch

from checkpoint import CheckpointError, load_model_and_tokenizer
from configurator import ConfigError, configure, one_of, validate
from evaluation.generate import peek_context
from model import context_problem, sampling_problems
from tokenizer import load_tokenizer

checkpoint = ""  # HF checkpoint directory, or a .pt written by train.py (base.pt)
tokenizer = ""  # default: the checkpoint directory's tokenizer.json
prompt = ""
system = ""  # optional system message
max_new_tokens = 256
temperature = 0.0  # 0 = greedy
top_p = 1.0
seed = 1337
dtype = ""  # "", "float32", "bfloat16", "float16"
device = "auto"  # "auto", "cpu", "cuda"
lang = ""  # the prompt's language: a ShifCon checkpoint (shifcon.json) shifts by it; "en" (its English) = no shift
steering = ""  # a statistics file (python -m methods.steering): steer the routing (docs/baselines.md)
steering_rule = "chen"  # "chen" (strength = lambda) or "steermoe" (strength = experts boosted and suppressed)
steering_strength = 0.022  # Chen et al.'s lambda with English as the first guide
steering_layers = ""  # "start,end" inclusive decoder layers; "" = every MoE layer but the first and last
steering_target = ""  # steermoe: the language steered away from (its statistics must be in the file)


def main(argv=None):
    defaults = {k: v for k, v in globals().items() if k in _SETTINGS}
    s, sources = configure(sys.argv[1:] if argv is None else argv, defaults)
    # the one sampling check (model.sampling_problems) decides which of the three are wrong
    bad = {p.split("=", 1)[0] for p in sampling_problems(s["temperature"], s["top_p"], s["max_new_tokens"])}
    validate(s, sources, dict(
        checkpoint=lambda v: None if v else "is required (a checkpoint directory or a .pt file)",
        prompt=lambda v: None if v else "is required",
        max_new_tokens=lambda v: "must be an integer >= 1" if "max_new_tokens" in bad else None,
        temperature=lambda v: "must be >= 0 and finite (0: greedy)" if "temperature" in bad else None,
        top_p=lambda v: "must be in (0, 1] (1: no nucleus cut)" if "top_p" in bad else None,
        seed=lambda v: None if 0 <= v <= 2 ** 63 - 1 else "must be in 0..2**63 - 1",
        dtype=one_of("", "float32", "bfloat16", "float16"), device=one_of("auto", "cpu", "cuda")))
    run_device = s["device"] if s["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if run_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device='cuda' ({sources['device']}): no CUDA device is available here (use 'cpu' or 'auto')")
    if s["checkpoint"].endswith(".pt") and not s["tokenizer"]:
        raise ConfigError(f"{s['checkpoint']} is a .pt file: pass --tokenizer=... (e.g. data/udhr/bpe.tiktoken)")
    t0 = time.time()
    try:  # the tokenizer first (cheap): the prompt's length is known before any weight is read
        tok = load_tokenizer(s["tokenizer"] or s["checkpoint"])
    except (OSError, ValueError) as err:
        _key = "tokenizer" if s["tokenizer"] else "checkpoint"
        raise ConfigError(f"{_key} ({sources[_key]}): {err}") from None
    prompt_ids, _ = tok.encode_chat(s["prompt"], None, system=s["system"] or None)

    def check_context(context):
        n, problem = len(prompt_ids), context_problem(len(prompt_ids), s["max_new_tokens"], context)
        if problem:
            raise ConfigError(f"max_new_tokens={s['max_new_tokens']} ({sources['max_new_tokens']}): " + (
                problem if n >= context else f"the prompt's {n} tokens + max_new_tokens exceed the model's "
                                             f"context of {context} tokens (at most {context - n} new tokens fit)"))
    from methods import shifcon
    is_shifcon = shifcon.find_vectors(s["checkpoint"]) is not None
    if is_shifcon and not s["lang"]:
        raise ConfigError(f"checkpoint={s['checkpoint']!r} is a ShifCon model ({shifcon.VECTORS_FILE}): pass "
                          "--lang=CODE, the prompt's language (its English code runs it unshifted)")
    if s["lang"] and not is_shifcon:
        raise ConfigError(f"lang={s['lang']!r} ({sources['lang']}): only a ShifCon checkpoint (with "
                          f"{shifcon.VECTORS_FILE}) uses the prompt's language; {s['checkpoint']} has none")
    context = peek_context(s["checkpoint"])
    if context is not None:
        check_context(context)
    try:  # checks the tokenizer against the model's vocabulary
        model, tok = load_model_and_tokenizer(s["checkpoint"], s["tokenizer"], device=run_device,
                                              dtype=getattr(torch, s["dtype"]) if s["dtype"] else None)
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    check_context(model.config.max_position_embeddings)
    if is_shifcon:  # its layers were trained shifted: the prompt's language decides the shift
        try:
            shifcon.install_for_inference(model, s["checkpoint"], [s["lang"]],
                                          unshifted="pass its English code as --lang").set_rows(s["lang"])
        except ValueError as err:
            raise ConfigError(f"lang={s['lang']!r} ({sources['lang']}): {err}") from None
    if s["steering"]:  # inference-time routing steering (methods/steering.py), through router.RoutingIntervention
        from methods import steering
        try:
            stats = steering.load_statistics(s["steering"])
            set_steering_edits = steering.steering_interventions(
                stats, model.config, s["steering_rule"], s["steering_strength"],
                steering.parse_layers(s["steering_layers"], model.config, names=steering.SETTING_FLAGS),
                target=s["steering_target"], path=s["steering"], names=steering.SETTING_FLAGS)
        except ValueError as err:
            raise ConfigError(f"steering: {err}") from None
        steering.set_steering(model, set_steering_edits)
    t1 = time.time()
    generator = torch.Generator(run_device).manual_seed(s["seed"])
    ids = torch.tensor([prompt_ids], device=run_device)
    new_ids = model.generate(ids, s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                             stop_ids=tok.stop_ids, generator=generator)[0]
    t2 = time.time()
    if new_ids and new_ids[-1] in tok.stop_ids:
        new_ids = new_ids[:-1]  # the end-of-turn token is not part of the reply
    print(tok.decode(new_ids))
    print(f"[load {t1 - t0:.1f}s, {len(new_ids)} tokens in {t2 - t1:.1f}s]", file=sys.stderr)
    return new_ids


_SETTINGS = ["checkpoint", "tokenizer", "prompt", "system", "max_new_tokens", "temperature", "top_p", "seed",
             "dtype", "device", "lang", "steering", "steering_rule", "steering_strength", "steering_layers", "steering_target"]

if __name__ == "__main__":
    main()
