"""
The synthetic world of experiments/transfer.py: four languages, a word-level tokenizer, facts,
entity splits, and the rows each split may appear in. No torch: plain lists of token ids.
See experiments/transfer.py for the study and the meaning of each split.
"""
import numpy as np

LANGS = ["en", "ren", "ord", "sub"]
TARGETS = LANGS[1:]
RELATIONS = {  # relation noun -> its 8 candidate values (English spelling)
    "color": ["red", "blue", "green", "white", "black", "yellow", "brown", "gray"],
    "job": ["baker", "farmer", "doctor", "singer", "tailor", "pilot", "judge", "miner"],
    "food": ["rice", "bread", "fish", "beans", "corn", "soup", "cheese", "figs"],
    "animal": ["cat", "dog", "horse", "goat", "owl", "fox", "bear", "wolf"],
}
# E = entity, R = relation noun, V = value; a question's answer is its value
STATEMENTS = ["the R of E is V .", "E has V as its R .", "V is the R of E ."]
QUESTIONS = ["question : what is the R of E ? answer :", "question : which R does E have ? answer :"]
PUNCT = {".", "?", ":"}
SYLLABLES = [c + v for c in "ptkmnsl" for v in "aiu"]  # the sub-token inventory of `sub` (21)


# -----------------------------------------------------------------------------
# languages and the tokenizer (word level: the languages are synthetic)
def english_words():
    words = {w for t in STATEMENTS + QUESTIONS for w in t.split() if w not in "ERV"}
    return sorted(words | set(RELATIONS) | {v for vs in RELATIONS.values() for v in vs})


def entity_names(n):
    rng = np.random.default_rng(12345)  # fixed: names are part of the vocabulary, not of a seed
    names = []
    while len(names) < n:
        name = "".join(rng.choice(["ba", "do", "ki", "lu", "me", "no", "ra", "si", "tu", "vo", "ze"], 3)).capitalize()
        if name not in names:
            names.append(name)
    return names


def sub_lexicon():
    """Each English word -> two syllables (unique pair): a fixed, arbitrary spelling."""
    words = english_words()
    pairs = np.random.default_rng(777).permutation(len(SYLLABLES) ** 2)[:len(words)]
    return {w: (SYLLABLES[p // len(SYLLABLES)], SYLLABLES[p % len(SYLLABLES)]) for w, p in zip(words, pairs)}


SUB = sub_lexicon()


def render(template, lang, ent, rel, val=None):
    """-> (tokens, src): the template in `lang`; src[j] = position in the ENGLISH rendering that
    token j expresses (the alignment used for token-level routing agreement)."""
    words = [{"E": ent, "R": rel, "V": val}.get(w, w) for w in template.split()]
    words = [w for w in words if w is not None]
    order = list(range(len(words)))
    if lang == "ord":  # reverse each maximal run of non-punctuation words
        out, run = [], []
        for i in order + [None]:
            if i is None or words[i] in PUNCT:
                out += run[::-1] + ([i] if i is not None else [])
                run = []
            else:
                run.append(i)
        order = out
    tokens, src = [], []
    for i in order:
        w = words[i]
        if w == ent:
            pieces = [w]  # a proper noun: the same token in every language
        elif lang == "en":
            pieces = [w]
        elif lang == "sub":
            pieces = [f"sub:{s}" for s in SUB[w]]
        else:
            pieces = [f"{lang}:{w}"]
        tokens += pieces
        src += [i] * len(pieces)
    return tokens, src


class Vocab:
    def __init__(self, n_entities):
        words = english_words()
        toks = ["<pad>", "<bos>", "<eos>"] + entity_names(n_entities) + words
        toks += [f"{l}:{w}" for l in ("ren", "ord") for w in words] + [f"sub:{s}" for s in SYLLABLES] + ["<tr>"]
        self.itos, self.stoi = toks, {t: i for i, t in enumerate(toks)}
        self.pad, self.bos, self.eos, self.tr = 0, 1, 2, self.stoi["<tr>"]

    def encode(self, tokens):
        return [self.stoi[t] for t in tokens]


# -----------------------------------------------------------------------------
# the world of one seed: facts, entity splits, datasets
def build_world(settings, seed, vocab):
    rng = np.random.default_rng(1000 + seed)
    counts = settings["n_entities"]
    names = list(rng.permutation(entity_names(sum(counts.values()))))
    split, start = {}, 0
    for name, n in counts.items():
        split[name] = names[start:start + n]
        start += n
    facts = {(e, r): RELATIONS[r][rng.integers(8)] for e in names for r in RELATIONS}
    return dict(split=split, facts=facts, seed=seed)


def statement_rows(world, vocab, ents, lang):
    rows = []
    for e in ents:
        for r in RELATIONS:
            v = world["facts"][e, r]
            for t in STATEMENTS:
                rows.append(dict(ids=[vocab.bos] + vocab.encode(render(t, lang, e, r, v)[0]) + [vocab.eos], ent=e))
            for qi in range(len(QUESTIONS)):
                rows.append(qa_row(world, vocab, e, r, lang, qi, answer_only=False))
    return rows


def qa_row(world, vocab, ent, rel, lang, qi, answer_only=True):
    """<bos> question answer-value <eos>; labels on the value and <eos> only (answer_only) or all."""
    q = [vocab.bos] + vocab.encode(render(QUESTIONS[qi], lang, ent, rel)[0])
    a = vocab.encode(render("V", lang, ent, rel, world["facts"][ent, rel])[0]) + [vocab.eos]
    labels = ([-100] * len(q) if answer_only else q) + a
    return dict(ids=q + a, labels=labels, ent=ent, rel=rel, lang=lang, qi=qi)


def translation_rows(world, vocab, ents):
    """<bos> English statement <tr> the same statement in a target language <eos>: parallel text."""
    rows = []
    for e in ents:
        for r in RELATIONS:
            v = world["facts"][e, r]
            for t in STATEMENTS:
                for lang in TARGETS:
                    rows.append(dict(ids=[vocab.bos] + vocab.encode(render(t, "en", e, r, v)[0]) + [vocab.tr]
                                     + vocab.encode(render(t, lang, e, r, v)[0]) + [vocab.eos], ent=e))
    return rows


def pretraining_data(world, vocab):
    """-> English rows (shared, test, bridge entities), target-language rows and English-target
    translation pairs (shared entities only)."""
    s = world["split"]
    en = statement_rows(world, vocab, s["shared"] + s["test"] + s["bridge"], "en")
    tgt = [row for lang in TARGETS for row in statement_rows(world, vocab, s["shared"], lang)]
    return en, tgt, translation_rows(world, vocab, s["shared"])


def finetuning_data(world, vocab, ents):
    """Target-language Q/A about `ents`, each with its English version (the anchor)."""
    rows = []
    for e in ents:
        for r in RELATIONS:
            for lang in TARGETS:
                for qi in range(len(QUESTIONS)):
                    row = qa_row(world, vocab, e, r, lang, qi)
                    row["anchor_ids"] = qa_row(world, vocab, e, r, "en", qi)["ids"]
                    rows.append(row)
    return rows


def assert_no_entity(rows, ents, vocab, what):
    ids = set(vocab.encode(ents))
    for row in rows:
        bad = ids.intersection(row["ids"]) | ids.intersection(row.get("anchor_ids", []))
        if bad:
            raise AssertionError(f"{what} contains a row about entity ids {sorted(bad)}")


def eval_items(world, vocab, ents, split):
    items = []
    for e in ents:
        for r in RELATIONS:
            for lang in LANGS:
                for qi in range(len(QUESTIONS)):
                    q_tok, q_src = render(QUESTIONS[qi], lang, e, r)
                    cands = [vocab.encode(render("V", lang, e, r, v)[0]) for v in RELATIONS[r]]
                    items.append(dict(split=split, ent=e, rel=r, lang=lang, qi=qi, prompt=[vocab.bos] + vocab.encode(q_tok),
                                      src=[-1] + q_src, cands=cands, gold=RELATIONS[r].index(world["facts"][e, r])))
    return items
