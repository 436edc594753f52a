"""
One tokenizer interface for train.py / eval.py / sample.py.

Two backends behind the same small class:
- the toy tokenizer: a byte-level BPE trained by data/udhr/prepare.py on the committed UDHR text,
  stored as a tiktoken ranks file (`base64(token_bytes) rank` per line) and run by a
  tiktoken.Encoding built from that dict (nothing is downloaded, nothing registered globally);
- a checkpoint's `tokenizer.json` (Qwen3, Phi-3.5), run by the `tokenizers` package.

Chat formats, one per model family (families/<model_type>.py CHAT_FORMAT; docs/architectures.md,
"Tokenizers and chat formats"); `|` marks the prompt/response split:
  qwen3  [<|im_start|>system\n{system}<|im_end|>\n]<|im_start|>user\n{prompt}<|im_end|>\n
         <|im_start|>assistant\n<think>\n\n</think>\n\n | {response}<|im_end|>      (thinking disabled)
  phi35  [<|system|>\n{system}<|end|>\n]<|user|>\n{prompt}<|end|>\n<|assistant|>\n | {response}<|end|>
The toy tokenizer has either, with 5 special tokens of its own (toy_special_tokens): the format of the
family its model is exported as. Its default is qwen3 (the toy model is a qwen3_moe); save_hf_tokenizer
refuses a toy tokenizer whose format is not the exported model's family's (a Qwen3 server would parse
a Phi-style template's output as ChatML and echo the prompt). Exports written before this named
Phi-3.5's layout with the toy's tokens "toy"; that name still loads, as phi35.

How a turn is encoded (encode_chat):
- The template is cut into markup specials and text. Each special becomes its single id, looked up
  by its string in the tokenizer (never a hard-coded number). User content (system/prompt/response)
  is inserted as TEXT: a special-token string typed by a user is encoded as ordinary text, never as
  a control token. For tokenizer.json this uses a copy of the tokenizer with `added_tokens` removed,
  because `tokenizers` otherwise matches added tokens anywhere in the input.
- The text between two specials (markup text + user content, e.g. "\\n" + prompt) is encoded in one
  piece, as Hugging Face encodes the whole rendered string. This matters for SentencePiece-style
  tokenizers (Phi-3.5) whose normalizer prepends "▁" to every encode call. An added token's
  lstrip/rstrip flags from tokenizer.json are honoured on the neighbouring text, as `tokenizers`
  does (Phi-3 files mark <|end|> etc. rstrip=True, which eats the "\\n" after them).
- prompt_ids is encoded on its own, so it is exactly what generation is fed. response_ids is the rest
  of the full encoding; in the rare case where the response's first characters merge with the
  prompt's trailing markup text (e.g. a Qwen response starting with "\\n"), the full encoding does not
  start with prompt_ids and the response is encoded on its own instead.

BOS (the token encode_chat puts before the prompt). The chat template is the checkpoint's own
statement of how a conversation is laid out, and Hugging Face's apply_chat_template and vLLM's chat
endpoint tokenize its rendering with add_special_tokens=False: a BOS is in a chat iff the template
writes `bos_token`. So, for a tokenizer.json whose directory has a chat template (tokenizer_config.json
`chat_template`, or chat_template.jinja), BOS = the template's rendering starts with `bos_token`. The
Phi-3.5 instruct template writes no BOS, so its chats have none, whatever `add_bos_token` or the
tokenizer.json post_processor (`<s> $A`) say about plain encode calls. Without a template: BOS iff the file's post_processor is a TemplateProcessing
whose single-sequence template starts with a special token (`<s> $A`), unless tokenizer_config.json
has an explicit boolean `add_bos_token`. qwen3 and the toy have none. `encode(text)` never adds BOS or
any special token.

Export (save_hf_tokenizer): a Hugging Face directory gets the files that make AutoTokenizer and
generate() behave as this class does. The toy BPE is written as a `tokenizers` byte-level BPE
(tokenizer.json) that encodes exactly as tiktoken does: every split of a token into two tokens is a
merge ranked by the token's rank, so the pair with the lowest-ranked result merges first, as in
tiktoken; `ignore_merges` takes a pre-token that is itself a token whole, as tiktoken does. With it:
tokenizer_config.json (a chat template that renders encode_chat's layout, eos/pad tokens) and
generation_config.json (the stop ids). A checkpoint tokenizer's own files are copied unchanged.
"""

import base64
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

from families import FAMILIES, of_config

# GPT-4 (cl100k) style pre-tokenisation, with \p{M} (combining marks) counted as part of a word:
# with plain \p{L} every Devanagari/Bengali/Telugu vowel sign would split a word in two. The
# possessive quantifiers of the cl100k original are dropped: Oniguruma (used by the trainer via
# `tokenizers`) reads `{1,3}+` differently from tiktoken's fancy-regex; without them both agree.
TOY_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{M}\p{N}]?[\p{L}\p{M}]+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Chat formats: each family's own lives in its families/<model_type>.py (CHAT_FORMAT). The toy tokenizer
# carries the format of the family its model is exported as, with special tokens of its own (see
# toy_special_tokens); the toy model (train.py model_config) is a qwen3_moe, so its default is qwen3.
CHAT_FORMATS = {f.CHAT_FORMAT_NAME: f.CHAT_FORMAT for f in FAMILIES.values()}
MODEL_TYPE_TO_CHAT_FORMAT = {model_type: f.CHAT_FORMAT_NAME for model_type, f in FAMILIES.items()}
TOY_CHAT_FORMAT = "qwen3"
# exports written before the toy followed its family named Phi-3.5's layout "toy"
_LEGACY_CHAT_FORMATS = {"toy": "phi35"}


def toy_special_tokens(chat_format):
    """The toy tokenizer's special tokens in a chat format: <|endoftext|> (padding) first, then the
    format's own, with ids n_ranks + i in this order. Every format has 5, so the toy vocabulary is
    4096 in each (data/udhr/prepare.py)."""
    _check_format(chat_format)
    return ("<|endoftext|>",) + tuple(s for s in CHAT_FORMATS[chat_format]["specials"] if s != "<|endoftext|>")


_SLOT = re.compile(r"\{(system|prompt|response)\}")


class Tokenizer:
    """encode/decode plain text and lay out chat turns. Build it with load_tokenizer()."""

    def __init__(self, *, encode_plain, decode, vocab_size, token_to_id, chat_format,
                 bos_id=None, strip=None, source=b"", path=None):
        fmt = CHAT_FORMATS[chat_format]
        self._encode_plain, self._decode, self._fmt = encode_plain, decode, fmt
        self._strip = strip or {}  # special string -> (lstrip, rstrip) flags of the added token
        self._special_re = re.compile("(" + "|".join(map(re.escape, fmt["specials"])) + ")")
        self.special_ids = {s: token_to_id[s] for s in fmt["specials"]}
        self.chat_format = chat_format
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = self.special_ids[fmt["eos"]]  # end of turn, appended after a response
        self.stop_ids = {self.special_ids[s] for s in fmt["stop"]}
        self.pad_id = self.special_ids[fmt["pad"]]
        self._source = source
        self.path = path  # the file it was loaded from (.tiktoken or tokenizer.json)

    def encode(self, text):
        """Plain text -> ids. Special-token strings in `text` are ordinary text; no BOS."""
        return self._encode_plain(text)

    def decode(self, ids):
        return self._decode(list(ids))

    def encode_chat(self, prompt, response=None, system=None):
        """-> (prompt_ids, response_ids). prompt_ids: [bos] + optional system turn + user turn +
        the assistant generation prompt. response_ids: response tokens + end-of-turn (eos_id),
        [] if response is None."""
        parts = self._fill(self._fmt["system"], system=system) if system is not None else []
        parts += self._fill(self._fmt["prompt"], prompt=prompt)
        bos = [] if self.bos_id is None else [self.bos_id]
        prompt_ids = bos + self._encode_parts(parts)
        if response is None:
            return prompt_ids, []
        resp_parts = self._fill(self._fmt["response"], response=response)
        full = bos + self._encode_parts(parts + resp_parts)
        if full[:len(prompt_ids)] == prompt_ids:
            return prompt_ids, full[len(prompt_ids):]
        return prompt_ids, self._encode_parts(resp_parts)  # boundary merge, see module docstring

    def fingerprint(self):
        """Short stable hash of the vocabulary file + chat format + special ids (keys caches)."""
        meta = json.dumps([self.chat_format, self.bos_id, self.eos_id, sorted(self.stop_ids),
                           self.pad_id, self.vocab_size, self.special_ids], sort_keys=True)
        return hashlib.sha256(meta.encode() + b"\0" + self._source).hexdigest()[:16]

    # --- internals
    def _fill(self, template, **values):
        """Template -> [("special", s) | ("text", s)]; slot values are always text."""
        parts = []
        for i, piece in enumerate(_SLOT.split(template)):
            if i % 2:  # a slot name
                parts.append(("text", values[piece]))
                continue
            for j, sub in enumerate(self._special_re.split(piece)):
                if sub:
                    parts.append(("special" if j % 2 else "text", sub))
        return parts

    def _encode_parts(self, parts):
        # merge neighbouring text so that the text between two specials is encoded in one call
        merged = []
        for kind, s in parts:
            if kind == "text" and merged and merged[-1][0] == "text":
                merged[-1] = ("text", merged[-1][1] + s)
            else:
                merged.append((kind, s))
        # honour the added tokens' lstrip/rstrip flags on the neighbouring text
        for i, (kind, s) in enumerate(merged):
            if kind != "special":
                continue
            lstrip, rstrip = self._strip.get(s, (False, False))
            if lstrip and i > 0 and merged[i - 1][0] == "text":
                merged[i - 1] = ("text", merged[i - 1][1].rstrip())
            if rstrip and i + 1 < len(merged) and merged[i + 1][0] == "text":
                merged[i + 1] = ("text", merged[i + 1][1].lstrip())
        ids = []
        for kind, s in merged:
            if kind == "special":
                ids.append(self.special_ids[s])
            elif s:
                ids.extend(self._encode_plain(s))
        return ids


# -----------------------------------------------------------------------------
def load_tiktoken_ranks(path):
    """Read a tiktoken ranks file (`base64(token_bytes) rank` per line) -> {bytes: rank}."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def toy_chat_format(cfg):
    """The chat format a toy BPE uses with a model of config cfg: that of the family the model is (a phimoe-
    shaped toy chats like Phi-3.5, and its export is refused otherwise); None (the toy default) for a config
    of no family."""
    try:
        return of_config(cfg).CHAT_FORMAT_NAME
    except ValueError:
        return None


def load_tokenizer(path, chat_format=None):
    """`.tiktoken` ranks file -> the toy tokenizer; a directory with tokenizer.json, or a
    tokenizer.json file -> that tokenizer. A directory holding one .tiktoken file (a toy export)
    loads that file: the original, not its tokenizer.json conversion. Chat format, unless given:
    tokenizer_config.json `sara_chat_format` (written by save_hf_tokenizer), else config.json
    `model_type`; a bare .tiktoken file: TOY_CHAT_FORMAT (the toy model's family)."""
    path = Path(path)
    if chat_format is None and path.is_dir():
        chat_format = _read_json_if_file(path / "tokenizer_config.json").get("sara_chat_format")
    if path.is_dir():
        ranks = sorted(path.glob("*.tiktoken"))  # a toy checkpoint exported by train.py
        if len(ranks) == 1:
            path = ranks[0]
    chat_format = _LEGACY_CHAT_FORMATS.get(chat_format, chat_format)
    if path.suffix == ".tiktoken":
        return _load_toy(path, chat_format or TOY_CHAT_FORMAT)
    tok_file = path / "tokenizer.json" if path.is_dir() else path
    if not tok_file.is_file():
        raise ValueError(f"tokenizer not found: {tok_file} (expected a .tiktoken file, a "
                         "tokenizer.json or a directory containing one)")
    if chat_format is None:
        chat_format = _read_json_if_file(tok_file.parent / "tokenizer_config.json").get("sara_chat_format")
        chat_format = _LEGACY_CHAT_FORMATS.get(chat_format, chat_format)
    if chat_format is None:
        chat_format = _chat_format_from_config(tok_file.parent / "config.json")
    return _load_hf(tok_file, chat_format)


def _read_json_if_file(file):
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def _check_format(chat_format):
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; known: {sorted(CHAT_FORMATS)}")


TOY_SPECIAL_TOKENS = toy_special_tokens(TOY_CHAT_FORMAT)  # the toy's default (data/udhr/prepare.py counts them)


def _chat_format_from_config(config_file):
    if not config_file.is_file():
        raise ValueError(f"{config_file} not found: pass chat_format explicitly")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_TYPE_TO_CHAT_FORMAT:
        raise ValueError(f"{config_file}: model_type {model_type!r} has no known chat format "
                         f"(known: {MODEL_TYPE_TO_CHAT_FORMAT}); pass chat_format explicitly")
    return MODEL_TYPE_TO_CHAT_FORMAT[model_type]


def _load_toy(path, chat_format):
    import tiktoken
    _check_format(chat_format)
    if not path.is_file():
        raise ValueError(f"tokenizer file not found: {path}")
    ranks = load_tiktoken_ranks(path)
    specials = {s: len(ranks) + i for i, s in enumerate(toy_special_tokens(chat_format))}
    enc = tiktoken.Encoding(f"sara-toy-{path.stem}-{chat_format}", pat_str=TOY_PAT_STR,
                            mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(encode_plain=enc.encode_ordinary, decode=enc.decode,
                     vocab_size=enc.n_vocab, token_to_id=specials, chat_format=chat_format,
                     source=path.read_bytes(), path=path)


def _load_hf(tok_file, chat_format):
    from tokenizers import Tokenizer as HFTokenizer
    _check_format(chat_format)
    raw = tok_file.read_bytes()
    data = json.loads(raw)
    full = HFTokenizer.from_str(raw.decode())
    token_to_id = {}
    for s in CHAT_FORMATS[chat_format]["specials"]:
        if full.token_to_id(s) is None:
            raise ValueError(f"{tok_file}: special token {s!r} required by chat format "
                             f"{chat_format!r} is missing")
        token_to_id[s] = full.token_to_id(s)
    # a copy without added tokens encodes user text with special strings as ordinary text
    plain = HFTokenizer.from_str(json.dumps({**data, "added_tokens": []}))
    strip = {t["content"]: (t.get("lstrip", False), t.get("rstrip", False))
             for t in data.get("added_tokens", [])}
    return Tokenizer(
        encode_plain=lambda text: plain.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: full.decode(ids, skip_special_tokens=False),
        vocab_size=full.get_vocab_size(with_added_tokens=True), token_to_id=token_to_id,
        chat_format=chat_format, bos_id=_bos_id(tok_file, data, full), strip=strip, source=raw,
        path=tok_file)


def _bos_id(tok_file, data, full):
    """The BOS encode_chat prepends, or None (rules in the module docstring)."""
    pp = data.get("post_processor") or {}
    procs = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    bos = None
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p["single"] and "SpecialToken" in p["single"][0]:
            bos = p["single"][0]["SpecialToken"]["id"]
    cfg_file = tok_file.parent / "tokenizer_config.json"
    cfg = _read_json_if_file(cfg_file)
    named_bos = _token_string(cfg.get("bos_token"))
    template = _chat_template(tok_file.parent, cfg)
    if template is not None:
        bos = named_bos or bos
        if bos is None or not _template_writes_bos(template, bos, _token_string(cfg.get("eos_token")) or ""):
            return None
    elif isinstance(cfg.get("add_bos_token"), bool):
        if not cfg["add_bos_token"]:
            return None
        bos = bos or named_bos
        if bos is None:
            raise ValueError(f"{cfg_file}: add_bos_token is true but no bos_token is named")
    if bos is None:
        return None
    if full.token_to_id(bos) is None:
        raise ValueError(f"{tok_file}: BOS token {bos!r} is not in the vocabulary")
    return full.token_to_id(bos)


def _token_string(tok):
    """tokenizer_config.json names a token as a string or as {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _chat_template(directory, cfg):
    """The directory's default chat template: chat_template.jinja (transformers 5 writes it there),
    else tokenizer_config.json `chat_template` (a string, or a list of named templates)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template if isinstance(template, str) else None


def _template_writes_bos(template, bos, eos):
    """Does the template's rendering of a one-turn chat start with the BOS string? Rendered as
    transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks); a template that needs
    more than that to render is read instead: it writes BOS iff it mentions bos_token."""
    import jinja2.sandbox  # a dependency of torch
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": "x"}], add_generation_prompt=True,
            bos_token=bos, eos_token=eos)
    except Exception:  # noqa: BLE001 (any failure to render: fall back to reading it)
        return "bos_token" in template
    return text.startswith(bos)


# -----------------------------------------------------------------------------
# export: the files that make a directory a Hugging Face tokenizer (see the module docstring)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def chat_template(chat_format, bos=False):
    """A Jinja chat template (Hugging Face's format) that renders encode_chat's layout:
    [system] + user + generation prompt == prompt_ids, and + an assistant turn == prompt + response.
    Further turns follow the same pattern (assistant turns end with the separator, e.g. "\\n").
    A format with `thinking_off` (Qwen3) has the thinking switch as Qwen3's own template does: the
    generation prompt ends with the empty think block only with enable_thinking=False (encode_chat
    always has it: thinking disabled), and of the assistant turns only those after the last user turn
    carry it."""
    fmt = CHAT_FORMATS[chat_format]
    sys_open, sys_close = fmt["system"].split("{system}")
    user_open, rest = fmt["prompt"].split("{prompt}")
    end = fmt["response"].split("{response}")[1]
    # the layouts share one turn ending (sys_close); the generation prompt follows it
    if not (rest.startswith(sys_close) and sys_close.startswith(end)):  # e.g. OLMoE's tulu: the assistant's
        raise ValueError(f"chat format {chat_format!r}: its turns do not share one ending, which the exported "  # differs
                         "template assumes; this format cannot be exported with a toy tokenizer (export a "
                         "checkpoint's own tokenizer files instead)")
    gen, sep = rest[len(sys_close):], sys_close[len(end):]
    think = fmt.get("thinking_off", "")
    assert gen.endswith(think), chat_format
    gen_open = gen[:len(gen) - len(think)]  # the generation prompt with thinking on

    def lit(s):  # a Jinja string literal
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    def turn(opening, closing):  # one message: opening + content + closing
        return "{{- " + lit(opening) + " + message['content'] + " + lit(closing) + " -}}"
    if not think:
        assistant, generation = turn(gen, end), "{{- " + lit(gen) + " -}}"
    else:
        assistant = ("{%- if loop.index0 > ns.last_user -%}" + turn(gen, end) + "{%- else -%}" + turn(gen_open, end)
                     + "{%- endif -%}")
        generation = ("{{- " + lit(gen_open) + " -}}{%- if enable_thinking is defined and enable_thinking is false -%}"
                      "{{- " + lit(think) + " -}}{%- endif -%}")
    return "".join([
        "{{- bos_token -}}" if bos else "",
        ("{%- set ns = namespace(last_user=-1) -%}{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
         "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}") if think else "",
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'system' -%}", turn(sys_open, sys_close),
        "{%- elif message['role'] == 'user' -%}", turn(user_open, sys_close),
        "{%- elif message['role'] == 'assistant' -%}", assistant,
        "{%- if not loop.last -%}{{- ", lit(sep), " -}}{%- endif -%}",
        "{%- else -%}{{- raise_exception('roles: system, user, assistant; got ' + message['role']) -}}",
        "{%- endif -%}{%- endfor -%}",
        "{%- if add_generation_prompt -%}", generation, "{%- endif -%}",
    ])


def toy_to_hf(path, chat_format=TOY_CHAT_FORMAT):
    """The toy tiktoken ranks file, with its special tokens in `chat_format` -> an equivalent
    `tokenizers.Tokenizer` (byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    ranks = load_tiktoken_ranks(path)
    b2u = _bytes_to_unicode()
    name = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {name(t): r for t, r in ranks.items()}
    # every split of a token into two tokens, ranked by the token's rank (ties: left part's rank)
    merges = sorted(((r, ranks[t[:i]], t[:i], t[i:]) for t, r in ranks.items() for i in range(1, len(t))
                     if t[:i] in ranks and t[i:] in ranks), key=lambda m: m[:2])
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[(name(a), name(b)) for _, _, a, b in merges],
                                ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TOY_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    specials = toy_special_tokens(chat_format)
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for i, s in enumerate(specials):
        assert tk.token_to_id(s) == len(ranks) + i, s
    return tk


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map, used by the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


PROBE = ("Everyone has the right to life, liberty and security of person. 1234567 \t\n\n"
         "Kila mtu ana haki ya kuishi. 世界人权宣言 मानव अधिकारों ప్రతి ఒక్కరికీ ሰብአዊ 🙂 it's")


def save_hf_tokenizer(tok, out_dir, model_max_length=None):
    """
    Make `out_dir` (e.g. a save_pretrained directory) a usable Hugging Face tokenizer directory for
    `tok`: AutoTokenizer gives tok's ids, apply_chat_template gives encode_chat's ids, generate()
    stops at tok.stop_ids. Files of a directory with tokenizer files of its own are kept.
      toy: tokenizer.json (converted, checked against tok on a multilingual probe before writing),
           tokenizer_config.json (chat template, eos/pad, `sara_chat_format`), generation_config.json,
           and the .tiktoken file itself (load_tokenizer prefers it);
      tokenizer.json tokenizers (Qwen3, Phi-3.5): their own files, copied unchanged; where they
           lack a chat template or generation_config.json, ours is written, with a warning.
    Returns the list of files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tok.path is None:
        raise ValueError("save_hf_tokenizer: this Tokenizer has no source file (build it with load_tokenizer)")
    src = Path(tok.path)
    model_vocab = _read_json_if_file(out_dir / "config.json").get("vocab_size")
    if model_vocab is not None and model_vocab < tok.vocab_size:
        raise ValueError(f"{out_dir / 'config.json'}: vocab_size {model_vocab} is smaller than the "
                         f"tokenizer's {tok.vocab_size} ({src}): the ids would not fit the model")
    written = []
    gen = {"eos_token_id": [tok.eos_id] + sorted(tok.stop_ids - {tok.eos_id}), "pad_token_id": tok.pad_id}
    if tok.bos_id is not None:
        gen["bos_token_id"] = tok.bos_id
    eos = _string_of(tok, tok.eos_id)
    pad = _string_of(tok, tok.pad_id)
    if src.suffix == ".tiktoken":
        model_type = _read_json_if_file(out_dir / "config.json").get("model_type")
        family_format = MODEL_TYPE_TO_CHAT_FORMAT.get(model_type)
        if family_format is not None and family_format != tok.chat_format:
            raise ValueError(f"{out_dir / 'config.json'}: a {model_type} model chats in {family_format!r} "
                             f"(families/{model_type}.py) but this toy tokenizer ({src}) is in {tok.chat_format!r}: "
                             f"load it with chat_format={family_format!r}; nothing written")
        hf = toy_to_hf(src, tok.chat_format)
        for text in (PROBE, PROBE.upper(), " ".join(PROBE.split()[::-1])):
            got, want = hf.encode(text, add_special_tokens=False).ids, tok.encode(text)
            if got != want:
                raise ValueError(f"{src}: the tokenizer.json conversion encodes {text[:40]!r}... differently "
                                 f"from tiktoken ({got[:12]} vs {want[:12]}); nothing written")
        hf.save(str(out_dir / "tokenizer.json"))
        cfg = dict(tokenizer_class="PreTrainedTokenizerFast", chat_template=chat_template(tok.chat_format),
                   bos_token=None, eos_token=eos, pad_token=pad, unk_token=None, add_bos_token=False,
                   add_eos_token=False, clean_up_tokenization_spaces=False, sara_chat_format=tok.chat_format)
        if model_max_length:
            cfg["model_max_length"] = model_max_length
        _write_json(out_dir / "tokenizer_config.json", cfg)
        _write_json(out_dir / "generation_config.json", gen)
        if (out_dir / src.name).resolve() != src.resolve():
            shutil.copyfile(src, out_dir / src.name)
        return ["tokenizer.json", "tokenizer_config.json", "generation_config.json", src.name]
    for f in TOKENIZER_FILES:  # a checkpoint's tokenizer: its own files, unchanged
        if (src.parent / f).is_file() and (out_dir / f).resolve() != (src.parent / f).resolve():
            shutil.copyfile(src.parent / f, out_dir / f)
            written.append(f)
    cfg = _read_json_if_file(out_dir / "tokenizer_config.json")
    if _chat_template(out_dir, cfg) is None:
        warnings.warn(f"{src.parent} has no chat template: writing one for chat format {tok.chat_format!r}")
        bos = None if tok.bos_id is None else _string_of(tok, tok.bos_id)
        cfg.update(chat_template=chat_template(tok.chat_format, bos=bos is not None), bos_token=bos,
                   eos_token=cfg.get("eos_token") or eos, pad_token=cfg.get("pad_token") or pad)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if bos is None:
            cfg["add_bos_token"] = False  # (transformers would else take BOS from the post_processor)
        _write_json(out_dir / "tokenizer_config.json", cfg)
        written.append("tokenizer_config.json")
    if not (out_dir / "generation_config.json").is_file():
        warnings.warn(f"{src.parent} has no generation_config.json: writing the stop ids {gen['eos_token_id']}")
        _write_json(out_dir / "generation_config.json", gen)
        written.append("generation_config.json")
    return sorted(set(written))


def _string_of(tok, token_id):
    """A token's string: the special's name, or (a BOS outside the chat specials) its decoding."""
    names = {i: s for s, i in tok.special_ids.items()}
    return names[token_id] if token_id in names else tok.decode([token_id])


def _write_json(file, obj):
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
