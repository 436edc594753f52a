"""
Exports are usable Hugging Face directories (tokenizer.py save_hf_tokenizer + checkpoint.py
save_hf). transformers is the oracle: AutoTokenizer gives our ids on every bundled language
and on random text, apply_chat_template gives encode_chat's ids, generation_config.json carries the
stop ids, and AutoModelForCausalLM gives our logits on a chat-formatted input.
"""
import json
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

import tokenizer as T  # noqa: E402
from checkpoint import save_hf  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from tokenizer import load_tokenizer, save_hf_tokenizer, toy_special_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "udhr" / "bpe.tiktoken"
PARALLEL = ROOT / "data" / "udhr" / "parallel.jsonl"
ROWS = [json.loads(line) for line in PARALLEL.read_text(encoding="utf-8").splitlines()]
# every character of the bundled text, plus whitespace / digits / punctuation the regex splits on
ALPHABET = sorted(set("".join(r["prompt"] + r["response"] for r in ROWS)) | set(" \t\n\r\n'0123456789.,;!?-"))
# the toy in Qwen3's layout (its default: the toy model is a qwen3_moe) and in Phi-3.5's:
# (end-of-turn token, its index among the toy's 5 specials)
EOT = {"qwen3": ("<|im_end|>", 2), "phi35": ("<|end|>", 4)}
ALL_SPECIALS = set(toy_special_tokens("qwen3")) | set(toy_special_tokens("phi35"))


@pytest.fixture(scope="module", params=list(EOT))
def exported(request, tmp_path_factory):
    """(our toy tokenizer, its exported directory, transformers' AutoTokenizer on it)."""
    tok = load_tokenizer(TOY, chat_format=request.param)
    out = tmp_path_factory.mktemp("export") / "hf"
    save_hf_tokenizer(tok, out, model_max_length=512)
    return tok, out, AutoTokenizer.from_pretrained(out)


def _chat_ids(hf, messages, **kw):
    # enable_thinking=False: Qwen3's switch for the empty think block encode_chat writes (other templates ignore it)
    if kw.get("add_generation_prompt"):
        kw.setdefault("enable_thinking", False)
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


# -----------------------------------------------------------------------------
# the toy tokenizer, converted
def test_export_files_and_autotokenizer_basics(exported):
    tok, out, hf = exported
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                               "generation_config.json", "bpe.tiktoken"}
    assert len(hf) == tok.vocab_size == 4096  # (the issue: an export without it loaded as length 1)
    eot, index = EOT[tok.chat_format]
    assert hf.eos_token == eot and hf.eos_token_id == tok.eos_id
    assert hf.pad_token_id == tok.pad_id and hf.bos_token is None
    assert {s: hf.convert_tokens_to_ids(s) for s in toy_special_tokens(tok.chat_format)} == tok.special_ids
    gen = GenerationConfig.from_pretrained(out)
    n = tok.vocab_size - 5  # the end of turn = n + index (<|end|> n + 4, <|im_end|> n + 2), <|endoftext|> = n
    assert gen.eos_token_id == [n + index, n] and gen.pad_token_id == n
    assert hf.model_max_length == 512


def test_autotokenizer_ids_equal_ours_on_every_bundled_language(exported):
    tok, _, hf = exported
    langs = {r["lang"] for r in ROWS}
    assert len(langs) == 11
    for lang in sorted(langs):
        text = "\n".join(r["prompt"] + "\n\n" + r["response"] for r in ROWS if r["lang"] == lang)
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, lang  # default add_special_tokens=True adds nothing
        assert hf.decode(ids) == text, lang


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=st.sampled_from(ALPHABET), max_size=200)))
def test_autotokenizer_ids_equal_ours_on_random_text(exported, text):
    tok, _, hf = exported
    assume(not any(s in text for s in ALL_SPECIALS))  # HF reads those as control tokens
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


@pytest.mark.parametrize("system", [None, "Be brief.", "Jibu kwa ufupi."])
def test_apply_chat_template_equals_encode_chat(exported, system):
    tok, _, hf = exported
    for row in ROWS[::97]:  # a spread of languages
        p, r = tok.encode_chat(row["prompt"], row["response"], system=system)
        msgs = ([] if system is None else [{"role": "system", "content": system}])
        msgs += [{"role": "user", "content": row["prompt"]}]
        assert _chat_ids(hf, msgs, add_generation_prompt=True) == p, row["id"]
        assert _chat_ids(hf, msgs + [{"role": "assistant", "content": row["response"]}]) == p + r, row["id"]


TEXT = st.one_of(st.text(max_size=40), st.text(alphabet=st.sampled_from(ALPHABET), max_size=80))


@settings(max_examples=100, deadline=None)
@given(TEXT, TEXT, st.one_of(st.none(), TEXT))
def test_apply_chat_template_equals_encode_chat_on_random_turns(exported, prompt, response, system):
    tok, _, hf = exported
    assume(not any(s in t for t in (prompt, response, system or "") for s in ALL_SPECIALS))
    # a response that starts with whitespace may merge with the generation prompt's "\n" in a
    # whole-string encoding; encode_chat keeps prompt_ids as generation sees them (tokenizer.py)
    assume(not response[:1].isspace())
    p, r = tok.encode_chat(prompt, response, system=system)
    msgs = ([] if system is None else [{"role": "system", "content": system}])
    msgs += [{"role": "user", "content": prompt}]
    assert _chat_ids(hf, msgs, add_generation_prompt=True) == p
    assert _chat_ids(hf, msgs + [{"role": "assistant", "content": response}]) == p + r


def test_exported_tokenizer_json_loads_back_as_the_toy(exported, tmp_path):
    tok, out, _ = exported
    only_json = tmp_path / "hf"
    only_json.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):  # no .tiktoken: the conversion is used
        (only_json / f).write_bytes((out / f).read_bytes())
    back = load_tokenizer(only_json)
    assert back.chat_format == tok.chat_format and back.path.name == "tokenizer.json" and back.bos_id is None
    assert (back.special_ids, back.eos_id, back.stop_ids) == (tok.special_ids, tok.eos_id, tok.stop_ids)
    for row in ROWS[::53]:
        assert back.encode_chat(row["prompt"], row["response"]) == tok.encode_chat(row["prompt"], row["response"])
    assert load_tokenizer(out).path.suffix == ".tiktoken"  # the original is preferred where present


def test_a_conversion_that_disagrees_is_refused(tmp_path, monkeypatch):
    good = T.toy_to_hf

    def without_some_merges(path, chat_format):
        tk = good(path, chat_format)
        data = json.loads(tk.to_str())
        data["model"]["merges"] = data["model"]["merges"][::2]
        data["model"]["ignore_merges"] = False
        from tokenizers import Tokenizer
        return Tokenizer.from_str(json.dumps(data))
    monkeypatch.setattr(T, "toy_to_hf", without_some_merges)
    with pytest.raises(ValueError, match="bpe.tiktoken: the tokenizer.json conversion encodes"):
        save_hf_tokenizer(load_tokenizer(TOY), tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "vocab_size": 4000}))
    with pytest.raises(ValueError, match=r"config.json: vocab_size 4000 is smaller than the tokenizer's 4096"):
        save_hf_tokenizer(load_tokenizer(TOY), tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()


# -----------------------------------------------------------------------------
# checkpoint tokenizers: their files are kept; a missing template or generation config is written
def test_checkpoint_tokenizer_files_are_copied_unchanged(tmp_path):
    from test_tokenizer import PHI35_TEMPLATE, _phi_like
    src = _phi_like(tmp_path / "phi", add_bos_token=False)
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "chat_template": PHI35_TEMPLATE,
                                                           "bos_token": "<s>", "eos_token": "<|endoftext|>"}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, 32001, 32007]}))
    out = tmp_path / "out"
    written = save_hf_tokenizer(load_tokenizer(src), out)
    assert written == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for f in written:
        assert (out / f).read_bytes() == (src / f).read_bytes(), f


@pytest.mark.parametrize("which", ["qwen", "phi"])
def test_checkpoint_tokenizer_without_template_gets_ours(which, tmp_path):
    from test_tokenizer import _phi_like, _qwen_like
    src = (_qwen_like if which == "qwen" else _phi_like)(tmp_path / which)
    tok = load_tokenizer(src)
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as caught:
        save_hf_tokenizer(tok, out)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "has no chat template" in messages[0]
    assert "has no generation_config.json" in messages[1]
    hf = AutoTokenizer.from_pretrained(out)
    prompt, response, system = "What is article 3 about?", "Life, liberty and security.", "Be brief."
    p, r = tok.encode_chat(prompt, response, system=system)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    assert _chat_ids(hf, msgs, add_generation_prompt=True) == p
    assert _chat_ids(hf, msgs + [{"role": "assistant", "content": response}]) == p + r
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tok.eos_id] + sorted(tok.stop_ids - {tok.eos_id})


# -----------------------------------------------------------------------------
# a whole toy export: weights + tokenizer, loaded by transformers
def test_toy_export_logits_with_automodel(tmp_path):
    tok = load_tokenizer(TOY)
    torch.manual_seed(0)
    cfg = MoEConfig(vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    intermediate_size=128, n_experts=4, top_k=2, moe_intermediate_size=32, qk_norm=True,
                    max_position_embeddings=512, init_std=0.2)
    model = MoETransformer(cfg).eval()
    out = tmp_path / "hf"
    save_hf(model, out)
    save_hf_tokenizer(tok, out, model_max_length=cfg.max_position_embeddings)
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager").eval()
    row = next(r for r in ROWS if r["lang"] == "sw")
    p, r = tok.encode_chat(row["prompt"], row["response"])
    ids = _chat_ids(hf_tok, [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["response"]}])
    assert ids == p + r
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x).logits, hf_model(x).logits
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert hf_model.generation_config.eos_token_id == [tok.eos_id, tok.pad_id]



# -----------------------------------------------------------------------------
# a toy export chats in its model family's format (families/<model_type>.py CHAT_FORMAT)
def _tiny_model(**kw):
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**{**dict(vocab_size=4096, hidden_size=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                               intermediate_size=32, n_experts=4, top_k=2, moe_intermediate_size=32,
                                               max_position_embeddings=256), **kw}))


QWEN_LIKE = dict(qk_norm=True)
PHI_LIKE = dict(router="sparsemixer", norm="layernorm", norm_eps=1e-5, attention_bias=True, lm_head_bias=True)


@pytest.mark.parametrize("arch,chat_format,model_type", [(QWEN_LIKE, "qwen3", "qwen3_moe"), (PHI_LIKE, "phi35", "phimoe")])
def test_toy_export_carries_its_familys_chat_format(tmp_path, arch, chat_format, model_type):
    out = tmp_path / "hf"
    save_hf(_tiny_model(**arch), out)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    wrong = "phi35" if chat_format == "qwen3" else "qwen3"
    with pytest.raises(ValueError, match=rf"a {model_type} model chats in '{chat_format}'.*chat_format='{chat_format}'"):
        save_hf_tokenizer(load_tokenizer(TOY, chat_format=wrong), out)
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    tok = load_tokenizer(TOY, chat_format=chat_format)
    save_hf_tokenizer(tok, out)
    assert load_tokenizer(out).chat_format == chat_format  # sample.py / eval.py read the export back
    hf = AutoTokenizer.from_pretrained(out)
    p, r = tok.encode_chat("Habari?", "Nzuri.", system="Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Habari?"}]
    assert _chat_ids(hf, msgs, add_generation_prompt=True) == p
    assert _chat_ids(hf, msgs + [{"role": "assistant", "content": "Nzuri."}]) == p + r
    opening = "<|im_start|>system\n" if chat_format == "qwen3" else "<|system|>\n"
    assert hf.apply_chat_template(msgs, tokenize=False).startswith(opening)


def test_qwen3_toy_template_has_qwen3s_thinking_switch(tmp_path):
    """As Qwen3's own template: the empty think block ends the generation prompt only with
    enable_thinking=False, and only the assistant turns after the last user turn carry it."""
    tok = load_tokenizer(TOY)
    save_hf_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "A"}]
    render = lambda m, **kw: hf.apply_chat_template(m, tokenize=False, **kw)  # noqa: E731
    assert render(msgs, add_generation_prompt=True) == "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\n"
    assert render(msgs, add_generation_prompt=True, enable_thinking=False) == \
        "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render(msgs + [{"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
                          {"role": "assistant", "content": "D"}]) == (
        "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nD<|im_end|>")
    p, _ = tok.encode_chat("A")
    sp = tok.special_ids
    think = [sp["<think>"]] + tok.encode("\n\n") + [sp["</think>"]] + tok.encode("\n\n")
    assert p[-len(think):] == think
    assert list(hf.apply_chat_template(msgs, tokenize=True, return_dict=False, add_generation_prompt=True)) == \
        p[:-len(think)]
