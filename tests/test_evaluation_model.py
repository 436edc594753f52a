"""evaluation/generate.py and evaluation/routing.py with a real (tiny) model: log-likelihoods against a
direct forward, a model whose lm_head always prefers "B", batched generation against one by one, and the
routing analysis on the bundled parallel text."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation.accuracy as A
import evaluation.benchmarks as B
import evaluation.generate as G
import evaluation.routing as R
from data.parallel import load_parallel_jsonl
from model import MoEConfig, MoETransformer
from test_evaluation_accuracy import mmlu_items

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PARALLEL = ROOT / "data" / "udhr" / "parallel.jsonl"
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"


def tiny_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, hidden_size=32, n_layers=3, n_heads=2, n_kv_heads=1,
               intermediate_size=64, n_experts=4, top_k=2, moe_intermediate_size=32, qk_norm=True,
               max_position_embeddings=512)
    return MoETransformer(MoEConfig(**{**cfg, **kw})).eval()


def test_forced_model_loglik_accuracy(tok):
    """A model whose lm_head prefers the token "B" everywhere answers B to every question."""
    model = tiny_model(tok, lm_head_bias=True)
    b_token = tok.encode_chat("x", "B")[1][0]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias[b_token] = 20.0
    respond = G.make_loglik_responder(model, tok, batch_size=3)
    s = A.summarize(A.run_benchmark(mmlu_items(), respond, benchmark="global_mmlu", protocol="loglik"))
    assert s["langs"]["sw"]["runs"] == [50.0] and s["langs"]["hi"]["runs"] == pytest.approx([100 / 3])
    items = {"sw": B.load_benchmark("belebele", FIX / "belebele", "sw")[0]}
    s = A.summarize(A.run_benchmark(items, respond, benchmark="belebele", protocol="loglik"))
    assert s["langs"]["sw"]["runs"] == pytest.approx([100 / 3])


def test_loglik_matches_a_direct_forward(tok):
    """Batched, left-padded, deduplicated scoring == log p(reply | prompt) from one plain forward per
    option, for one-token letters and for multi-token option texts."""
    model = tiny_model(tok, seed=3)
    prompts = ["Short?", "A much longer question with more tokens in it, to force left padding?"]
    for options in (G.LETTERS, ("Nairobi", "Mombasa ya pwani", "x", "Ziwa Viktoria")):
        got = G.letter_logliks(model, tok, prompts, batch_size=2, options=options)
        for n, p in enumerate(prompts):
            for c, o in enumerate(options):
                prompt_ids, reply = tok.encode_chat(p, o)
                reply = reply[:-1]  # without end-of-turn
                ids = torch.tensor([prompt_ids + reply])
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).logits[0].double(), -1)
                want = sum(lp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(reply))
                assert got[n, c].item() == pytest.approx(want.item(), abs=1e-4)


def test_generation_batched_equals_one_by_one(tok):
    model = tiny_model(tok, seed=1)
    prompts = ["Habari?", "Mji mkuu wa Kenya ni upi? Jibu kwa kifupi.", "Na?", "2 + 2 = ?"]
    kw = dict(max_new_tokens=6, temperature=0.0)
    batched = G.make_generative_responder(model, tok, batch_size=3, **kw)(prompts, 0)
    single = G.make_generative_responder(model, tok, batch_size=1, **kw)(prompts, 0)
    assert batched == single and all(isinstance(t, str) for t in batched)
    sampled = G.make_generative_responder(model, tok, batch_size=4, max_new_tokens=6, temperature=1.0, seed=5)
    assert sampled(prompts, 0) == sampled(prompts, 0)  # run r is seeded: reproducible


def test_routing_on_bundled_text_one_value_per_layer_and_language(tok):
    model = tiny_model(tok, seed=2)
    samples = load_parallel_jsonl(PARALLEL)
    dists = R.routing_distributions(model, tok, samples, batch_size=64, max_len=48)
    rows = R.routing_divergence(dists, "en", layers=model.config.moe_layers)
    langs = sorted({s["lang"] for s in samples} - {"en"})
    assert len(langs) == 10 and sorted({r["lang"] for r in rows}) == langs
    assert len(rows) == len(langs) * 3 and {(r["lang"], r["layer"]) for r in rows} == {
        (l, k) for l in langs for k in range(3)}
    for r in rows:
        assert 0 < r["js"] <= r["js_paired"] + 1e-7  # JS is jointly convex: pooled <= mean of paired
        assert r["js_norm"] == pytest.approx(r["js"] / math.log(2)) and r["js_paired_norm"] <= 1
    assert {r["n_items"] for r in rows if r["lang"] == "ne"} == {48}


def test_routing_is_zero_for_identical_text(tok):
    model = tiny_model(tok, seed=2)
    en = [s for s in load_parallel_jsonl(PARALLEL) if s["lang"] == "en"][:12]
    copies = [dict(s, lang="xx", id=s["id"][:-3] + "-xx") for s in en]
    dists = R.routing_distributions(model, tok, en + copies[::-1], batch_size=5, max_len=64)
    rows = R.routing_divergence(dists, "en")
    assert len(rows) == 3 and all(r["n_items"] == 12 for r in rows)
    for key in R.METRICS:
        assert max(abs(r[key]) for r in rows) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tok):
    cpu = tiny_model(tok, seed=4)
    gpu = tiny_model(tok, seed=4).cuda()
    prompts = ["Habari?", "Mji mkuu wa Kenya ni upi? Jibu kwa kifupi."]
    np.testing.assert_allclose(G.letter_logliks(gpu, tok, prompts).numpy(),
                               G.letter_logliks(cpu, tok, prompts).numpy(), atol=1e-3)
    sampled = G.make_generative_responder(gpu, tok, max_new_tokens=5, temperature=0.1, seed=1)
    assert sampled(prompts, 0) == sampled(prompts, 0)  # a CUDA generator, seeded per run
    samples = [s for s in load_parallel_jsonl(PARALLEL) if s["lang"] in ("en", "sw")][:40]
    rows = {dev: R.routing_divergence(R.routing_distributions(m, tok, samples, max_len=64), "en")
            for dev, m in (("cpu", cpu), ("gpu", gpu))}
    np.testing.assert_allclose([r["js"] for r in rows["gpu"]], [r["js"] for r in rows["cpu"]], atol=1e-5)
