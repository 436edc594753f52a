"""
One tokenizer interface for train.py / eval.py / sample.py.

Two backends behind the same small class:
- the toy tokenizer: a byte-level BPE trained by data/udhr/prepare.py on the committed UDHR text,
  stored as a tiktoken ranks file (`base64(token_bytes) rank` per line) and run by a
  tiktoken.Encoding built from that dict (nothing is downloaded, nothing registered globally);
- a checkpoint's `tokenizer.json` (Qwen3, Phi-3.5), run by the `tokenizers` package.

Chat formats (ARCHITECTURES.md, "Tokenizers and chat formats"); `|` marks the prompt/response split:
  qwen3  [<|im_start|>system\n{system}<|im_end|>\n]<|im_start|>user\n{prompt}<|im_end|>\n
         <|im_start|>assistant\n<think>\n\n</think>\n\n | {response}<|im_end|>      (thinking disabled)
  phi35  [<|system|>\n{system}<|end|>\n]<|user|>\n{prompt}<|end|>\n<|assistant|>\n | {response}<|end|>
  toy    same shape as phi35, with the toy tokenizer's own special tokens.

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

BOS: qwen3 and toy have none. For a tokenizer.json, a BOS is prepended once, at the start of the
prompt, iff the file's post_processor is a TemplateProcessing whose single-sequence template starts
with a special token (Llama/Phi style `<s> $A`); that is the token `encode(..., add_special_tokens=True)`
would add. If a tokenizer_config.json next to it has an explicit boolean `add_bos_token`, that flag
wins, because transformers' Llama fast tokenizer rebuilds the post_processor from it. `encode(text)`
never adds BOS or any special token.
"""

import base64
import hashlib
import json
import re
from pathlib import Path

# GPT-4 (cl100k) style pre-tokenisation, with \p{M} (combining marks) counted as part of a word:
# with plain \p{L} every Devanagari/Bengali/Telugu vowel sign would split a word in two. The
# possessive quantifiers of the cl100k original are dropped: Oniguruma (used by the trainer via
# `tokenizers`) reads `{1,3}+` differently from tiktoken's fancy-regex; without them both agree.
TOY_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{M}\p{N}]?[\p{L}\p{M}]+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Toy special tokens; their ids follow the mergeable ranks in this order (n_ranks + i).
# <|endoftext|> doubles as the padding token.
TOY_SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

_PHI_SHAPE = dict(
    system="<|system|>\n{system}<|end|>\n",
    prompt="<|user|>\n{prompt}<|end|>\n<|assistant|>\n",
    response="{response}<|end|>",
    specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
    eos="<|end|>", stop=("<|end|>", "<|endoftext|>"), pad="<|endoftext|>",
)
CHAT_FORMATS = {
    "qwen3": dict(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        prompt="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        response="{response}<|im_end|>",
        specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"),
        eos="<|im_end|>", stop=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
    ),
    "phi35": _PHI_SHAPE,
    "toy": _PHI_SHAPE,
}
MODEL_TYPE_TO_CHAT_FORMAT = {"qwen3_moe": "qwen3", "phimoe": "phi35"}

_SLOT = re.compile(r"\{(system|prompt|response)\}")


class Tokenizer:
    """encode/decode plain text and lay out chat turns. Build it with load_tokenizer()."""

    def __init__(self, *, encode_plain, decode, vocab_size, token_to_id, chat_format,
                 bos_id=None, strip=None, source=b""):
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


def load_tokenizer(path, chat_format=None):
    """`.tiktoken` ranks file -> the toy tokenizer; a directory with tokenizer.json, or a
    tokenizer.json file -> that tokenizer, chat format from the directory's config.json
    `model_type` unless given."""
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").exists():
        ranks = sorted(path.glob("*.tiktoken"))  # a toy checkpoint exported by train.py
        if len(ranks) == 1:
            path = ranks[0]
    if path.suffix == ".tiktoken":
        return _load_toy(path, chat_format or "toy")
    tok_file = path / "tokenizer.json" if path.is_dir() else path
    if not tok_file.is_file():
        raise ValueError(f"tokenizer not found: {tok_file} (expected a .tiktoken file, a "
                         "tokenizer.json or a directory containing one)")
    if chat_format is None:
        chat_format = _chat_format_from_config(tok_file.parent / "config.json")
    return _load_hf(tok_file, chat_format)


def _check_format(chat_format):
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; known: {sorted(CHAT_FORMATS)}")


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
    if chat_format != "toy":
        raise ValueError(f"{path}: a .tiktoken file carries the toy tokenizer; chat format "
                         f"{chat_format!r} needs that model's tokenizer.json")
    if not path.is_file():
        raise ValueError(f"tokenizer file not found: {path}")
    ranks = load_tiktoken_ranks(path)
    specials = {s: len(ranks) + i for i, s in enumerate(TOY_SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(f"sara-toy-{path.stem}", pat_str=TOY_PAT_STR,
                            mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(encode_plain=enc.encode_ordinary, decode=enc.decode,
                     vocab_size=enc.n_vocab, token_to_id=specials, chat_format="toy",
                     source=path.read_bytes())


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
        chat_format=chat_format, bos_id=_bos_id(tok_file, data, full), strip=strip, source=raw)


def _bos_id(tok_file, data, full):
    """BOS = the leading special token of a TemplateProcessing post_processor (see docstring)."""
    pp = data.get("post_processor") or {}
    procs = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    bos = None
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p["single"] and "SpecialToken" in p["single"][0]:
            bos = p["single"][0]["SpecialToken"]["id"]
    cfg_file = tok_file.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if isinstance(cfg.get("add_bos_token"), bool):
        if not cfg["add_bos_token"]:
            return None
        if bos is None:
            bos = cfg.get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            if bos is None:
                raise ValueError(f"{cfg_file}: add_bos_token is true but no bos_token is named")
    if bos is None:
        return None
    if full.token_to_id(bos) is None:
        raise ValueError(f"{tok_file}: BOS token {bos!r} is not in the vocabulary")
    return full.token_to_id(bos)
